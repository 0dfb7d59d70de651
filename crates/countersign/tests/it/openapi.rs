//! The hand-written OpenAPI document stays true: its paths and methods are exactly the routers' (the v1
//! router and the LLM proxy's, which it merges), every
//! path parameter is declared, every `$ref` resolves, and the server serves it at `/v1/openapi.json`
//! without a key.

use std::collections::BTreeSet;

use countersign::client::Client;
use serde_json::Value;

use crate::helpers::TestServer;

/// The sources of every router the server serves: the v1 surface and the LLM proxy it merges.
const ROUTER_SOURCES: [(&str, &str); 2] =
    [("http/mod.rs", include_str!("../../src/http/mod.rs")), ("proxy/mod.rs", include_str!("../../src/proxy/mod.rs"))];
const DOCUMENT: &str = include_str!("../../src/http/openapi.json");
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
}

/// The text of one call's arguments: from just after its `(` to the matching `)`.
fn call_arguments<'a>(text: &'a str, file: &str) -> &'a str {
    let mut depth = 1usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced `.route(` call in {file}");
}

/// Every `(path, method)` the routers serve, read from their `.route("PATH", METHODS)` calls: methods are the
/// `get(` / `.post(` / `axum::routing::delete(` … calls inside each one.
fn router_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (file, source) in ROUTER_SOURCES {
        for (start, _) in source.match_indices(".route(") {
            let args = call_arguments(&source[start + ".route(".len()..], file);
            let open = args.find('"').expect("a route path literal");
            let close = open + 1 + args[open + 1..].find('"').expect("the end of the route path literal");
            let path = &args[open + 1..close];
            let rest = &args[close + 1..];
            let mut found = false;
            for method in METHODS {
                for (at, _) in rest.match_indices(&format!("{method}(")) {
                    let before = rest[..at].chars().next_back();
                    if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
                        routes.insert((path.to_owned(), method.to_owned()));
                        found = true;
                    }
                }
            }
            assert!(found, "no method found in the route for {path} in {file}");
        }
    }
    routes
}

fn document_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((path.clone(), method.to_owned()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_document_has_exactly_the_routers_paths_and_methods() {
    let router = router_routes();
    // The parser itself: a plain route, a chained method and a fully qualified `axum::routing::delete`.
    for (path, method) in [("/v1/actions", "get"), ("/v1/actions", "post"), ("/v1/sessions/{id}", "delete")] {
        assert!(router.contains(&(path.to_owned(), method.to_owned())), "the route parser missed {method} {path}");
    }
    assert!(router.contains(&("/v1/openapi.json".to_owned(), "get".to_owned())));
    // The proxy's routes are read too, and the v1 router still merges them (so they are served).
    for (path, method) in [("/llm/{provider}/v1/chat/completions", "post"), ("/llm/{provider}/v1/models", "get")] {
        assert!(router.contains(&(path.to_owned(), method.to_owned())), "the route parser missed {method} {path}");
    }
    assert!(ROUTER_SOURCES[0].1.contains(".merge(crate::proxy::router())"), "the v1 router merges the proxy's");
    let documented = document_routes(&document());
    let undocumented: Vec<_> = router.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&router).collect();
    assert!(
        undocumented.is_empty() && extra.is_empty(),
        "routes missing from openapi.json: {undocumented:?}; documented but not served: {extra:?}"
    );
}

#[tokio::test]
async fn every_path_parameter_is_declared() {
    let doc = document();
    let resolve = |p: &Value| -> Value {
        match p.get("$ref").and_then(Value::as_str) {
            Some(r) => doc.pointer(&r[1..]).cloned().unwrap_or(Value::Null),
            None => p.clone(),
        }
    };
    for (path, item) in doc["paths"].as_object().unwrap() {
        let placeholders: BTreeSet<String> =
            path.split('{').skip(1).filter_map(|s| s.split_once('}')).map(|(name, _)| name.to_owned()).collect();
        for method in METHODS {
            let Some(operation) = item.get(method) else { continue };
            let empty = Vec::new();
            let declared: BTreeSet<String> = item["parameters"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .chain(operation["parameters"].as_array().unwrap_or(&empty))
                .map(resolve)
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            assert_eq!(declared, placeholders, "path parameters of {method} {path}");
            assert!(operation["summary"].is_string(), "{method} {path} has no summary");
            assert!(operation["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}: responses");
        }
    }
}

fn collect_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_ref_resolves_to_a_component() {
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 50, "expected the document to use components");
    let broken: BTreeSet<&str> = refs
        .into_iter()
        .filter(|r| !r.starts_with("#/components/") || doc.pointer(&r[1..]).is_none_or(Value::is_null))
        .collect();
    assert!(broken.is_empty(), "unresolved $refs: {broken:?}");
}

#[tokio::test]
async fn the_server_serves_the_document_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let anonymous = Client::new(server.admin.base(), None).unwrap();
    let response = anonymous.get("/v1/openapi.json").await.unwrap();
    assert_eq!(response.status, 200, "{:?}", response.body);
    assert!(response.content_type.starts_with("application/json"), "{}", response.content_type);
    assert!(response.str("/openapi").starts_with("3.1"), "{:?}", response.body.get("openapi"));
    assert_eq!(response.str("/info/title"), "Countersign");
    assert_eq!(response.str("/info/version"), env!("CARGO_PKG_VERSION"), "info.version follows the crate");
    assert_eq!(response.body, document());
    // Every answer, a problem too, tells browsers not to guess another content type.
    for path in ["/v1/openapi.json", "/v1/actions", "/no/such/path"] {
        let raw = reqwest::get(format!("{}{path}", server.admin.base())).await.unwrap();
        assert_eq!(raw.headers()["x-content-type-options"], "nosniff", "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_llm_proxy_is_documented_in_the_providers_shapes() {
    let doc = document();
    let chat = &doc["paths"]["/llm/{provider}/v1/chat/completions"]["post"];
    for status in ["200", "202", "403", "502", "504"] {
        assert!(chat["responses"].get(status).is_some(), "chat completions: {status}");
    }
    assert!(chat["responses"]["200"]["content"].get("text/event-stream").is_some(), "streaming is documented");
    let schemas = &doc["components"]["schemas"];
    for name in ["OpenAIChatCompletionRequest", "OpenAIChatCompletion", "AnthropicMessageRequest", "AnthropicMessage"] {
        assert_eq!(schemas[name]["additionalProperties"], true, "{name} stays loose: providers add fields");
    }
    assert_eq!(
        schemas["LlmApprovalRequired"]["properties"]["error"]["properties"]["type"]["const"],
        "approval_required"
    );
    let denied = &doc["components"]["responses"]["AnthropicDenied"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(denied, "#/components/schemas/AnthropicError");
    assert_eq!(schemas["Target"]["discriminator"]["mapping"]["llm"], "#/components/schemas/LlmTarget");
}
