//! The dashboard at `/ui/`: login, logout, cookie flags and CSRF refusals over plain HTTP; then the whole
//! approver's path in a real browser (tests/browser/dashboard.mjs, playwright-core driving Debian's
//! chromium), with screenshots under target/dashboard-screenshots/.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::Value;

use crate::helpers::{TestServer, action};

/// `application/x-www-form-urlencoded` bodies (reqwest's `form` feature is off in this workspace).
trait FormBody {
    fn form<T: serde::Serialize + ?Sized>(self, form: &T) -> Self;
}

impl FormBody for reqwest::RequestBuilder {
    fn form<T: serde::Serialize + ?Sized>(self, form: &T) -> Self {
        self.header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).unwrap())
    }
}

/// A client that does not follow redirects, so each answer can be checked.
fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The value of `name="csrf" value="…"` or `data-csrf="…"` in a page.
fn csrf_in(html: &str) -> String {
    let start = html
        .find("name=\"csrf\" value=\"")
        .map(|i| i + "name=\"csrf\" value=\"".len())
        .or_else(|| html.find("data-csrf=\"").map(|i| i + "data-csrf=\"".len()))
        .expect("the page carries a CSRF token");
    html[start..].split('"').next().unwrap().to_owned()
}

fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response.headers().get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// Logs in with a key; answers the session cookie (`cs_ui=…`) and the CSRF token of the session.
async fn login(base: &str, key: &str) -> (String, String) {
    let client = http();
    let page = client.get(format!("{base}/ui/login")).send().await.unwrap();
    let login_cookie = cookie_pair(&set_cookies(&page)[0]);
    let csrf = csrf_in(&page.text().await.unwrap());
    let response = client
        .post(format!("{base}/ui/login"))
        .header(COOKIE, &login_cookie)
        .form(&[("key", key), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let session = set_cookies(&response).into_iter().find(|c| c.starts_with("cs_ui=")).unwrap();
    let session = cookie_pair(&session);
    let pending = client.get(format!("{base}/ui/pending")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(pending.status(), StatusCode::OK);
    let csrf = csrf_in(&pending.text().await.unwrap());
    (session, csrf)
}

#[tokio::test]
async fn login_cookie_flags_csrf_and_logout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let base = server.admin.base().to_owned();
    let agent = server.agent("refund-bot").await;
    let viewer = server.user("vera", "viewer").await;
    let client = http();

    // Without a session, pages send the browser to the login form; posts are refused.
    let response = client.get(format!("{base}/ui/pending")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/ui/login");
    let response = client.post(format!("{base}/ui/logout")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The login form needs its own token (double submit), and a user's key.
    let page = client.get(format!("{base}/ui/login")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let login_cookie = set_cookies(&page)[0].clone();
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"), "{login_cookie}");
    let login_cookie = cookie_pair(&login_cookie);
    let csrf = csrf_in(&page.text().await.unwrap());
    let post = |key: &str, token: Option<&str>| {
        let mut form = vec![("key", key.to_owned())];
        if let Some(t) = token {
            form.push(("csrf", t.to_owned()));
        }
        client.post(format!("{base}/ui/login")).header(COOKIE, &login_cookie).form(&form).send()
    };
    let admin_key = server.admin.key().unwrap().to_owned();
    assert_eq!(post(&admin_key, None).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(post(&admin_key, Some("wrong")).await.unwrap().status(), StatusCode::FORBIDDEN);
    let wrong = post("cs_sk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Some(&csrf)).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.text().await.unwrap().contains("unknown API key"));
    let agent_login = post(agent.key().unwrap(), Some(&csrf)).await.unwrap();
    assert_eq!(agent_login.status(), StatusCode::FORBIDDEN);
    assert!(agent_login.text().await.unwrap().contains("needs a user key"));

    let ok = post(&admin_key, Some(&csrf)).await.unwrap();
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[LOCATION], "/ui/pending");
    let session_cookie = set_cookies(&ok).into_iter().find(|c| c.starts_with("cs_ui=")).unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(session_cookie.contains(flag), "{flag} missing: {session_cookie}");
    }
    assert!(!session_cookie.contains("Secure"), "plain-http public URL: no Secure flag: {session_cookie}");
    assert!(!session_cookie.contains(&admin_key), "the cookie never holds the key");
    let session = cookie_pair(&session_cookie);
    let pending = client.get(format!("{base}/ui/pending")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(pending.status(), StatusCode::OK);
    assert_eq!(pending.headers()["cache-control"], "no-store");
    assert!(pending.headers().contains_key("content-security-policy"));
    let html = pending.text().await.unwrap();
    assert!(html.contains("admin") && html.contains("Nothing is waiting"));
    let csrf = csrf_in(&html);

    // A held action shows in the queue; deciding it needs the session's CSRF token.
    let submitted = agent.submit_action(&action("payments.charge.card")).await.unwrap();
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let approval = submitted.str("/approval/id").to_owned();
    let list = client.get(format!("{base}/ui/pending/list")).header(COOKIE, &session).send().await.unwrap();
    assert!(list.text().await.unwrap().contains(&approval));
    let decide = format!("{base}/ui/approvals/{approval}/decide");
    for form in [vec![("decision", "approve")], vec![("decision", "approve"), ("csrf", "not-the-token")]] {
        let refused = client.post(&decide).header(COOKIE, &session).form(&form).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refused.headers()["content-type"].to_str().unwrap().starts_with("application/problem+json"));
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "forbidden");
    }
    // No body and no content type at all: still 403, not a parse error.
    let bare = client.post(&decide).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(bare.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.admin.get_approval(&approval).await.unwrap().str("/status"), "pending");

    // The viewer sees the reason it cannot decide, and the gateway refuses it anyway.
    let (viewer_session, viewer_csrf) = login(&base, viewer.key().unwrap()).await;
    let detail =
        client.get(format!("{base}/ui/approvals/{approval}")).header(COOKIE, &viewer_session).send().await.unwrap();
    let detail = detail.text().await.unwrap();
    assert!(detail.contains("viewers cannot decide approvals"), "{detail}");
    assert!(detail.contains("disabled"));
    let refused = client
        .post(&decide)
        .header(COOKIE, &viewer_session)
        .form(&[("decision", "approve"), ("csrf", viewer_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("viewers cannot decide"));

    // With the token, the decision goes through the gateway like the API's.
    let approved = client
        .post(&decide)
        .header(COOKIE, &session)
        .form(&[("decision", "approve"), ("note", "ok <b>by me</b>"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), StatusCode::SEE_OTHER);
    let api = server.admin.get_approval(&approval).await.unwrap();
    assert_eq!(api.str("/status"), "approved");
    let history =
        client.get(format!("{base}/ui/history?status=approved")).header(COOKIE, &session).send().await.unwrap();
    let history = history.text().await.unwrap();
    assert!(history.contains("by me") && !history.contains("<b>by me"), "the note is escaped: {history}");

    // Logout needs the token too; afterwards the cookie is cleared and worthless.
    let refused = client.post(format!("{base}/ui/logout")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let out = client
        .post(format!("{base}/ui/logout"))
        .header(COOKIE, &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let cleared = set_cookies(&out).into_iter().find(|c| c.starts_with("cs_ui=")).unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let after = client.get(format!("{base}/ui/pending")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);

    // Revoking the key behind a session ends the session at its next request.
    let (viewer_session, _) = login(&base, viewer.key().unwrap()).await;
    let vera_key = viewer.key().unwrap();
    let last_four = &vera_key[vera_key.len() - 4..];
    let keys = server.admin.list_keys().await.unwrap();
    let items = keys.body["items"].as_array().unwrap();
    let id = items.iter().find(|k| k["last_four"] == last_four).unwrap()["id"].as_str().unwrap().to_owned();
    let revoked = server.admin.revoke_key(&id).await.unwrap();
    assert!(revoked.status < 300, "{:?}", revoked.body);
    let after = client.get(format!("{base}/ui/pending")).header(COOKIE, &viewer_session).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    server.stop().await;
}

/// The workspace's target directory, where the screenshots go.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

#[tokio::test]
async fn approver_path_in_a_real_browser() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/browser-env (installs Debian's chromium and playwright-core)"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core/package.json").exists(),
        "playwright-core is not installed in {}: run scripts/browser-env",
        browser_dir.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let agent = server.agent("refund-bot").await;
    let viewer = server.user("vera", "viewer").await;
    let shots = target_dir().join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let run = tokio::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(server.admin.base())
        .arg(server.admin.key().unwrap())
        .arg(viewer.key().unwrap())
        .arg(agent.key().unwrap())
        .arg(&shots)
        .current_dir(&browser_dir)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test finished within 180 s")
        .expect("node runs (Node 20 on PATH; see scripts/browser-env)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("dashboard browser test passed"), "{stdout}\n{stderr}");
    for shot in ["02-pending-live.png", "03-drawer.png", "04-history.png", "06-viewer-phone-drawer.png"] {
        assert!(shots.join(shot).exists(), "screenshot {shot} was not saved");
    }
    server.stop().await;
}
