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
pub(crate) trait FormBody {
    fn form<T: serde::Serialize + ?Sized>(self, form: &T) -> Self;
}

impl FormBody for reqwest::RequestBuilder {
    fn form<T: serde::Serialize + ?Sized>(self, form: &T) -> Self {
        self.header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).unwrap())
    }
}

/// A client that does not follow redirects, so each answer can be checked.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The value of `name="csrf" value="…"` or `data-csrf="…"` in a page.
pub(crate) fn csrf_in(html: &str) -> String {
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
/// Posts the logout form of `base` with the session cookie and its CSRF token.
pub(crate) async fn logout(client: &reqwest::Client, base: &str, session: &str, csrf: &str) -> reqwest::Response {
    client.post(format!("{base}/ui/logout")).header(COOKIE, session).form(&[("csrf", csrf)]).send().await.unwrap()
}

pub(crate) async fn login(base: &str, key: &str) -> (String, String) {
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
    // Logging out without a login just goes to the login form.
    let response = client.post(format!("{base}/ui/logout")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/ui/login");

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
    let out = logout(&client, &base, &session, &csrf).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let cleared = set_cookies(&out).into_iter().find(|c| c.starts_with("cs_ui=")).unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let after = client.get(format!("{base}/ui/pending")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    // Who logged in and out is in the audit log.
    for name in ["dashboard.login", "dashboard.logout"] {
        let query = countersign::client::AuditQuery { action: Some(name.into()), ..Default::default() };
        let events = server.admin.query_audit(&query).await.unwrap().body;
        let events = events["events"].as_array().unwrap();
        assert!(!events.is_empty(), "no {name} event");
        assert_eq!(events[0]["actor"]["kind"], "user", "{events:?}");
    }

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

/// A session ends after 30 minutes without a request, well inside its 12 hours; requests less than that apart
/// keep it going.
#[tokio::test]
async fn an_idle_dashboard_session_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(crate::helpers::ShiftedClock::default());
    let server = TestServer::start_with(crate::helpers::config(dir.path(), None), Some(clock.clone())).await;
    let base = server.admin.base().to_owned();
    let (session, _) = login(&base, server.admin.key().unwrap()).await;
    for _ in 0..3 {
        clock.advance(chrono::Duration::minutes(25));
        let (status, _) = page(&base, &session, "/ui/pending").await;
        assert_eq!(status, StatusCode::OK, "a session in use ended");
    }
    clock.advance(chrono::Duration::minutes(31));
    let ended = http().get(format!("{base}/ui/pending")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(ended.status(), StatusCode::SEE_OTHER);
    assert_eq!(ended.headers()[LOCATION], "/ui/login");
    // Logging out of a login that ended goes to the login form and clears the dead cookie.
    let out = http().post(format!("{base}/ui/logout")).header(COOKIE, &session).form(&[("csrf", "x")]).send().await;
    let out = out.unwrap();
    assert_eq!((out.status(), &out.headers()[LOCATION]), (StatusCode::SEE_OTHER, &"/ui/login".parse().unwrap()));
    let cleared = set_cookies(&out).into_iter().find(|c| c.starts_with("cs_ui=")).unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    // Its activity is what counted: a new login works at once.
    let (fresh, _) = login(&base, server.admin.key().unwrap()).await;
    assert_eq!(page(&base, &fresh, "/ui/pending").await.0, StatusCode::OK);

    // What an open page fetches by itself (the queue's timer, live updates) is not activity, nor is its live
    // stream connecting again (EventSource sends no header of ours; the browser reconnects on its own).
    let background = |path: &str| {
        http().get(format!("{base}{path}")).header(COOKIE, &fresh).header("x-countersign-background", "1").send()
    };
    for _ in 0..2 {
        clock.advance(chrono::Duration::minutes(14));
        assert_eq!(background("/ui/pending/list").await.unwrap().status(), StatusCode::OK);
        let stream = http()
            .get(format!("{base}/ui/events"))
            .header(COOKIE, &fresh)
            .header(axum::http::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
    }
    clock.advance(chrono::Duration::minutes(3));
    let ended = background("/ui/pending/list").await.unwrap();
    assert_eq!(ended.status(), StatusCode::SEE_OTHER, "a page left open kept its session alive");
    server.stop().await;
}

/// An approver sees what will be replayed: bidi overrides and zero-width characters in an agent's params and
/// reasoning show as visible markers, never as characters that redraw the text around them.
#[tokio::test]
async fn invisible_characters_in_agent_text_show_as_markers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let base = server.admin.base().to_owned();
    let agent = server.agent("bot").await;
    let held = agent
        .submit_action(&serde_json::json!({"capability": "payments.charge.card",
            "params": {"to": "acct \u{202E}0001\u{202C}", "we\u{200B}ird": 1},
            "reasoning": {"goal": "pay\u{2066} bob\u{2069}"}}))
        .await
        .unwrap();
    assert_eq!(held.status, 202, "{:?}", held.body);
    let (admin, _) = login(&base, server.admin.key().unwrap()).await;
    let (status, html) = page(&base, &admin, &format!("/ui/approvals/{}", held.str("/approval/id"))).await;
    assert_eq!(status, StatusCode::OK);
    for hidden in ['\u{202E}', '\u{202C}', '\u{200B}', '\u{2066}', '\u{2069}'] {
        assert!(!html.contains(hidden), "U+{:04X} reached the page", u32::from(hidden));
    }
    assert!(html.contains("acct ⟨U+202E⟩0001⟨U+202C⟩") && html.contains("we⟨U+200B⟩ird"), "{html}");
    assert!(html.contains("pay⟨U+2066⟩ bob⟨U+2069⟩"), "{html}");
    server.stop().await;
}

/// GET a dashboard page with a session; answers (status, body).
async fn page(base: &str, session: &str, path: &str) -> (StatusCode, String) {
    let response = http().get(format!("{base}{path}")).header(COOKIE, session).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// POST a dashboard form with a session; answers (status, Location, body).
async fn submit_form(base: &str, session: &str, path: &str, form: &[(&str, &str)]) -> (StatusCode, String, String) {
    let response = http().post(format!("{base}{path}")).header(COOKIE, session).form(form).send().await.unwrap();
    let location = response.headers().get(LOCATION).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (response.status(), location, response.text().await.unwrap())
}

/// The first `attr="…"` value in a page.
fn attr_in(html: &str, attr: &str) -> String {
    let needle = format!("{attr}=\"");
    let start = html.find(&needle).map(|i| i + needle.len()).unwrap_or_else(|| panic!("no {attr} in {html}"));
    html[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn operator_pages_jobs_sessions_webhooks_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::config(dir.path(), None);
    // A failed delivery waits an hour for its next attempt, so its job stays queued and can be cancelled.
    config.jobs.webhook_retry_base = Duration::from_secs(3600);
    let server = TestServer::start_with(config, None).await;
    let base = server.admin.base().to_owned();
    let agent = server.agent("refund-bot").await;
    let viewer = server.user("vera", "viewer").await;
    let (admin, csrf) = login(&base, server.admin.key().unwrap()).await;
    let csrf = csrf.as_str();

    // Every page renders for an admin and is linked from the nav.
    for (path, marker) in [
        ("/ui/jobs", "<h1>Jobs</h1>"),
        ("/ui/sessions", "Mint a session"),
        ("/ui/webhooks", "Create a webhook"),
        ("/ui/policy", "policy-version"),
    ] {
        let (status, html) = page(&base, &admin, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {html}");
        assert!(html.contains(marker), "{path} lacks {marker}: {html}");
        for link in ["/ui/jobs", "/ui/sessions", "/ui/webhooks", "/ui/policy"] {
            assert!(html.contains(&format!("href=\"{link}\"")), "{path}: the nav links {link}");
        }
        assert!(html.contains("aria-current=\"page\""), "{path} marks its tab");
    }

    // Webhooks: a CSRF-less create is refused; with the token the secret is shown once; the list escapes.
    let receiver = "http://127.0.0.1:1/hook";
    let hook_form =
        [("url", receiver), ("events", "approval.requested"), ("format", "json"), ("description", "<i>ops</i>")];
    let (status, _, _) = submit_form(&base, &admin, "/ui/webhooks", &hook_form).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page(&base, &admin, "/ui/webhooks").await.1.contains("No webhooks."));
    let mut with_token = hook_form.to_vec();
    with_token.push(("csrf", csrf));
    let (status, _, html) = submit_form(&base, &admin, "/ui/webhooks", &with_token).await;
    assert_eq!(status, StatusCode::CREATED, "{html}");
    let secret = html.split("id=\"webhook-secret\">").nth(1).unwrap().split('<').next().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(html.contains("ops") && !html.contains("<i>ops"), "the description is escaped");
    let hook = attr_in(&html, "data-webhook");
    let (_, listed) = page(&base, &admin, "/ui/webhooks").await;
    assert!(listed.contains(&hook) && !listed.contains(&secret), "the secret is shown only once");
    let bad_hook = [("url", "ftp://x"), ("events", "approval.*"), ("csrf", csrf)];
    let (status, _, html) = submit_form(&base, &admin, "/ui/webhooks", &bad_hook).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html.contains("must be http or https"), "{html}");

    // A held action raises `approval.requested`: one delivery, which fails and waits for its retry.
    let submitted = agent.submit_action(&action("payments.charge.card")).await.unwrap();
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let queued = "/ui/jobs?kind=webhook.deliver&state=queued";
    let mut html = String::new();
    for _ in 0..100 {
        html = page(&base, &admin, queued).await.1;
        if html.contains("data-label=\"Attempts\">1/") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(html.contains("data-label=\"Attempts\">1/"), "one attempt, then queued for the retry: {html}");
    let (_, deliveries) = page(&base, &admin, &format!("/ui/webhooks/{hook}")).await;
    assert!(deliveries.contains("approval.requested") && deliveries.contains("no answer"), "{deliveries}");
    assert!(deliveries.contains(" ms</td>"), "latency: {deliveries}");

    // Jobs: filtered list, detail, and a cancel that needs the token.
    let job = attr_in(&html, "data-job");
    assert!(html.contains("<option value=\"webhook.deliver\" selected>"), "{html}");
    let (status, html) = page(&base, &admin, "/ui/jobs?kind=audit.export").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No jobs here.") && !html.contains(&job));
    assert_eq!(page(&base, &admin, "/ui/jobs?kind=nonsense").await.0, StatusCode::BAD_REQUEST);
    let (status, html) = page(&base, &admin, &format!("/ui/jobs/{job}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"job-error\"") && html.contains("Cancel job"), "{html}");
    let cancel = format!("/ui/jobs/{job}/cancel");
    assert_eq!(submit_form(&base, &admin, &cancel, &[]).await.0, StatusCode::FORBIDDEN);
    let (status, location, _) = submit_form(&base, &admin, &cancel, &[("csrf", csrf)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, format!("/ui/jobs/{job}"));
    assert_eq!(server.admin.get_job(&job).await.unwrap().str("/state"), "cancelled");
    let html = page(&base, &admin, &format!("/ui/jobs/{job}")).await.1;
    assert!(html.contains("cancelled by admin") && !html.contains("Cancel job"), "{html}");
    let (status, _, html) = submit_form(&base, &admin, &cancel, &[("csrf", csrf)]).await;
    assert_eq!(status, StatusCode::CONFLICT, "a second cancel is the gateway's 409, shown on the page: {html}");

    // Webhook delete needs the token.
    let delete = format!("/ui/webhooks/{hook}/delete");
    assert_eq!(submit_form(&base, &admin, &delete, &[]).await.0, StatusCode::FORBIDDEN);
    let (status, location, _) = submit_form(&base, &admin, &delete, &[("csrf", csrf)]).await;
    assert_eq!((status, location.as_str()), (StatusCode::SEE_OTHER, "/ui/webhooks"));
    assert!(!page(&base, &admin, "/ui/webhooks").await.1.contains(&hook));

    // Sessions: mint shows the token once; revoke needs the token.
    let mint = [("agent", "refund-bot"), ("scopes", "payments.*, refunds.issue"), ("ttl_seconds", "600")];
    assert_eq!(submit_form(&base, &admin, "/ui/sessions", &mint).await.0, StatusCode::FORBIDDEN);
    let mut with_token = mint.to_vec();
    with_token.push(("csrf", csrf));
    let (status, _, html) = submit_form(&base, &admin, "/ui/sessions", &with_token).await;
    assert_eq!(status, StatusCode::CREATED, "{html}");
    let token = html.split("id=\"minted-token\">").nth(1).unwrap().split('<').next().unwrap().to_owned();
    assert!(token.starts_with("cs_st_"), "{token}");
    let session_id = attr_in(&html, "data-session");
    assert!(html.contains("payments.*, refunds.issue") && html.contains("active"), "{html}");
    let (_, listed) = page(&base, &admin, "/ui/sessions").await;
    assert!(listed.contains(&session_id) && !listed.contains(&token), "the token is shown only once");
    let (status, _, html) = submit_form(
        &base,
        &admin,
        "/ui/sessions",
        &[("agent", "refund-bot"), ("ttl_seconds", "999999"), ("csrf", csrf)],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html.contains("24 hours") && html.contains("value=\"999999\""), "the refusal keeps the form: {html}");
    let revoke = format!("/ui/sessions/{session_id}/revoke");
    assert_eq!(submit_form(&base, &admin, &revoke, &[]).await.0, StatusCode::FORBIDDEN);
    let (status, location, _) = submit_form(&base, &admin, &revoke, &[("csrf", csrf)]).await;
    assert_eq!((status, location.as_str()), (StatusCode::SEE_OTHER, "/ui/sessions"));
    assert!(page(&base, &admin, "/ui/sessions").await.1.contains("status-revoked"));

    // Policy: the current text; validation with line and column; a dry run with its verdict.
    let (_, html) = page(&base, &admin, "/ui/policy").await;
    assert!(html.contains("hold-charges") && html.contains("policy.yaml"), "{html}");
    let bad = "version: 1\nrules:\n  - name: x\n    effect: sometimes\n";
    assert_eq!(submit_form(&base, &admin, "/ui/policy/validate", &[("source", bad)]).await.0, StatusCode::FORBIDDEN);
    let (status, _, html) = submit_form(&base, &admin, "/ui/policy/validate", &[("source", bad), ("csrf", csrf)]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{html}");
    assert!(html.contains("class=\"line\">4<") && html.contains("class=\"column\">"), "line and column: {html}");
    let good = "version: 1\nrules:\n  - name: ok\n    effect: allow\n    conditions: { capability: \"a.b.c\" }\n";
    let (status, _, html) =
        submit_form(&base, &admin, "/ui/policy/validate", &[("source", good), ("csrf", csrf)]).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("Valid: version") && html.contains("1 rules"), "{html}");
    let dry = [("agent", "refund-bot"), ("capability", "payments.charge.card"), ("params", "{\"amount\": 5}")];
    assert_eq!(submit_form(&base, &admin, "/ui/policy/evaluate", &dry).await.0, StatusCode::FORBIDDEN);
    let mut with_token = dry.to_vec();
    with_token.push(("csrf", csrf));
    let (status, _, html) = submit_form(&base, &admin, "/ui/policy/evaluate", &with_token).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("id=\"verdict-effect\">require_approval<") && html.contains("hold-charges"), "{html}");
    assert!(html.contains("verdict-explanation"), "{html}");
    let (status, _, html) = submit_form(
        &base,
        &admin,
        "/ui/policy/evaluate",
        &[("agent", "refund-bot"), ("capability", "payments.charge.card"), ("params", "[1, <b>"), ("csrf", csrf)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        html.contains("not JSON") && html.contains("[1, ") && !html.contains("[1, <b>"),
        "the bad params come back escaped: {html}"
    );

    // A viewer reads the pages; the admin-only forms are disabled with the gateway's reason.
    let (viewer_session, viewer_csrf) = login(&base, viewer.key().unwrap()).await;
    for path in ["/ui/sessions", "/ui/webhooks", "/ui/policy"] {
        let (status, html) = page(&base, &viewer_session, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {html}");
        assert!(html.contains("id=\"blocked-reason\"") && html.contains("needs the admin role"), "{path}: {html}");
        assert!(html.contains("<fieldset disabled"), "{path}: {html}");
    }
    let (status, html) = page(&base, &viewer_session, "/ui/jobs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(&job), "viewers see the jobs: {html}");
    let mut with_token = mint.to_vec();
    with_token.push(("csrf", viewer_csrf.as_str()));
    let (status, _, html) = submit_form(&base, &viewer_session, "/ui/sessions", &with_token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the gateway refuses a viewer anyway: {html}");
    assert!(html.contains("needs the admin role"));
    // Validating a policy is an admin's too: the form is disabled, and a post gets the page saying why.
    let (_, html) = page(&base, &viewer_session, "/ui/policy").await;
    assert!(html.contains("id=\"validate-blocked\"") && html.contains("You cannot validate"), "{html}");
    let validate = [("source", good), ("csrf", viewer_csrf.as_str())];
    let (status, _, html) = submit_form(&base, &viewer_session, "/ui/policy/validate", &validate).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains("You cannot validate") && !html.contains("Valid: version"), "{html}");
    server.stop().await;
}

/// The `data-seq` values of the audit rows in a page, in page order.
fn seqs_in(html: &str) -> Vec<i64> {
    html.split("<tr data-seq=\"").skip(1).map(|rest| rest.split('"').next().unwrap().parse().unwrap()).collect()
}

/// The `href` of the link with `rel="…"`, with `&amp;` decoded.
fn rel_link(html: &str, rel: &str) -> Option<String> {
    let start = html.find(&format!("rel=\"{rel}\" href=\""))? + format!("rel=\"{rel}\" href=\"").len();
    Some(html[start..].split('"').next().unwrap().replace("&amp;", "&"))
}

#[tokio::test]
async fn audit_page_time_filters_order_and_pages_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let base = server.admin.base().to_owned();
    let agent = server.agent("refund-bot").await;
    let (admin, _) = login(&base, server.admin.key().unwrap()).await;
    // Enough events for more than one page of 100.
    for _ in 0..40 {
        let submitted = agent.submit_action(&action("payments.charge.card")).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    }
    let api = |query: &str| {
        let request = http().get(format!("{base}/v1/audit?{query}")).bearer_auth(server.admin.key().unwrap());
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (_, all) = api("limit=1000").await;
    let events = all["events"].as_array().unwrap().clone();
    let head = events.last().unwrap()["seq"].as_i64().unwrap();
    assert!(head > 100, "more than a page of events: {head}");

    // The page opens on the newest events, newest first; older pages and back again.
    let (status, html) = page(&base, &admin, "/ui/audit").await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let first = seqs_in(&html);
    assert_eq!(first.len(), 100);
    assert_eq!(first[0], head, "the newest event is on top");
    assert!(first.windows(2).all(|w| w[0] > w[1]), "newest first: {first:?}");
    assert!(html.contains("Times are UTC") && html.contains("data-live=\"prepend\""), "{html}");
    assert!(rel_link(&html, "prev").is_none(), "nothing is newer than the head");
    let older = rel_link(&html, "next").expect("an Older link");
    assert!(older.contains(&format!("before={}", head - 99)) && older.contains("order=newest"), "{older}");
    let (_, html) = page(&base, &admin, &older).await;
    let second = seqs_in(&html);
    assert_eq!(second.first(), Some(&(head - 100)), "the next page starts right below the first");
    assert!(html.contains("data-live=\"\""), "an older page does not tail");
    let newer = rel_link(&html, "prev").expect("a Newer link back");
    let (_, html) = page(&base, &admin, &newer).await;
    assert_eq!(seqs_in(&html), first, "Newer from the second page is the first page again");

    // Oldest first from seq 1, the same pages the other way.
    let (_, html) = page(&base, &admin, "/ui/audit?order=oldest").await;
    let oldest = seqs_in(&html);
    assert_eq!(oldest, (1..=100).collect::<Vec<_>>());
    assert!(rel_link(&html, "prev").is_none(), "nothing is older than seq 1");
    let next = rel_link(&html, "next").expect("a Newer link");
    assert!(next.contains("after=100") && next.contains("order=oldest"), "{next}");
    let (_, html) = page(&base, &admin, &next).await;
    assert_eq!(seqs_in(&html).first(), Some(&101));
    assert!(html.contains("data-live=\"append\""), "the last page in oldest order tails: {html}");
    assert!(html.contains("id=\"audit-newest\""), "a jump to the newest events is always there");

    // Time filters: `datetime-local` values (no offset) are UTC, with seconds; both ends inclusive.
    let pick = &events[10];
    let time_us = pick["time_us"].as_i64().unwrap();
    let at = chrono::DateTime::from_timestamp_micros(time_us).unwrap();
    let local = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let since = local(at - chrono::TimeDelta::seconds(1));
    let until = local(at + chrono::TimeDelta::seconds(1));
    let path = format!("/ui/audit?order=oldest&since={since}&until={until}");
    let (status, html) = page(&base, &admin, &path).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let seqs = seqs_in(&html);
    assert!(seqs.contains(&pick["seq"].as_i64().unwrap()), "{seqs:?}");
    let in_window = events
        .iter()
        .filter(|e| {
            let t = e["time_us"].as_i64().unwrap();
            t >= (at - chrono::TimeDelta::seconds(1)).timestamp_micros() / 1_000_000 * 1_000_000
                && t <= (at + chrono::TimeDelta::seconds(1)).timestamp_micros() / 1_000_000 * 1_000_000
        })
        .count();
    assert_eq!(seqs.len(), in_window.min(100), "exactly the events in the window");
    assert!(html.contains(&format!("value=\"{since}\"")), "the form keeps the time: {html}");
    let (_, html) = page(&base, &admin, "/ui/audit?since=2999-01-01T00:00").await;
    assert!(seqs_in(&html).is_empty() && html.contains("No events match."), "{html}");
    // RFC 3339 with an offset is read too, and shown in UTC.
    let (status, html) = page(&base, &admin, "/ui/audit?since=2999-01-01T02:00:00%2B02:00").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("value=\"2999-01-01T00:00:00\""), "{html}");

    // Bad input: a clear message on the page (400), the form kept, never a 500.
    for (query, message) in [
        ("since=yesterday", "`yesterday` is not a time"),
        ("until=2026-13-45T99:00", "is not a time"),
        ("since=2026-11-23T10:00&until=2026-11-23T09:00", "`since` is after `until`"),
        ("before=abc", "`abc` is not an audit seq"),
        ("order=sideways", "`sideways` is not an order"),
    ] {
        let (status, html) = page(&base, &admin, &format!("/ui/audit?{query}&action=approval.*")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {html}");
        assert!(html.contains("role=\"alert\"") && html.contains(message), "{query}: {html}");
        assert!(html.contains("value=\"approval.*\"") && seqs_in(&html).is_empty(), "{query}: {html}");
    }
    // The live tail's fragment takes the same filters and refuses the same bad input.
    let rows = http()
        .get(format!("{base}/ui/audit/rows?after={}&order=newest", head - 3))
        .header(COOKIE, &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(rows.status(), StatusCode::OK);
    assert_eq!(seqs_in(&rows.text().await.unwrap()), vec![head, head - 1, head - 2]);
    let rows = http().get(format!("{base}/ui/audit/rows?since=nope")).header(COOKIE, &admin).send().await.unwrap();
    assert_eq!(rows.status(), StatusCode::BAD_REQUEST);

    // REST reads times with the same parser: a UTC date and time without offset, and the same refusal.
    let (status, body) = api(&format!("since={since}&until={until}&limit=1000")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["events"].as_array().unwrap().len(), in_window);
    let (status, body) = api("since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("`yesterday` is not a time"), "{body}");
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
    // The browser script's measurements (the appear latency of new approvals), shown with `--nocapture`.
    eprintln!("{stdout}");
    for shot in [
        "02-pending-live.png",
        "03-drawer.png",
        "04-history.png",
        "06-viewer-phone-drawer.png",
        "08-jobs.png",
        "08-sessions.png",
        "08-webhooks.png",
        "08-policy.png",
        "09-policy-dry-run.png",
    ] {
        assert!(shots.join(shot).exists(), "screenshot {shot} was not saved");
    }
    server.stop().await;
}

/// A page's live stream ends soon after its login does (here: logged out on another tab).
#[tokio::test]
async fn the_live_stream_ends_with_its_login() {
    use futures_util::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let base = server.admin.base().to_owned();
    let (session, csrf) = login(&base, server.admin.key().unwrap()).await;
    let client = http();
    let stream = client.get(format!("{base}/ui/events")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("ready"));
    let out = logout(&client, &base, &session, &csrf).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a logged-out page ends");
    server.stop().await;
}

/// The queue shows the oldest 200 pending approvals and says when more are waiting, pointing to History.
#[tokio::test]
async fn a_queue_longer_than_a_page_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::helpers::config(dir.path(), None);
    settings.rate_limit.per_second = 0;
    let server = TestServer::start_with(settings, None).await;
    let base = server.admin.base().to_owned();
    let bot = server.agent("bot").await;
    let (session, _) = login(&base, server.admin.key().unwrap()).await;
    for n in 0..201 {
        if n == 200 {
            let (_, html) = page(&base, &session, "/ui/pending/list").await;
            assert!(!html.contains("queue-more"), "exactly a page: nothing more to say");
        }
        assert_eq!(bot.submit_action(&action("payments.charge.card")).await.unwrap().status, 202);
    }
    let (status, html) = page(&base, &session, "/ui/pending").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(html.matches("<tr data-approval=").count(), 200);
    assert!(html.contains("id=\"queue-more\"") && html.contains("/ui/history?status=pending"), "{html}");
    server.stop().await;
}
