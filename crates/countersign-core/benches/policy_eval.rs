//! Benchmark of `Policy::evaluate` on generated, realistic policies of 100 and 10,000 rules.
//!
//! The policies spread rules over 40 domains and many verbs and entities, the way a large organisation's
//! policy grows: capability pins, domain-wide rules with parameter thresholds, rules with regex
//! `content_patterns`, agent-specific rules, LLM rules on models and token limits, and a few rules without a
//! capability anchor (`*.delete.*`, agent-only) that every action has to be checked against. The actions
//! decided are the expensive kinds: one that matches the last rule that could apply to it, and one that
//! matches nothing and falls through to the default after scanning its text against every content rule of
//! its domain. Targets: median below 5 µs at 100 rules and below 50 µs at 10,000. This is a benchmark, not a
//! test: it asserts nothing about time.

use std::hint::black_box;

use countersign_core::capability::Capability;
use countersign_core::policy::{EvalInput, Facts, Policy};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const DOMAINS: usize = 40;
const VERBS: [&str; 8] = ["create", "update", "send", "issue", "read", "export", "approve", "sync"];
const ENTITIES: [&str; 8] = ["card", "invoice", "message", "contact", "report", "ticket", "order", "file"];

/// A tiny deterministic generator, so every run benchmarks the same policy.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        // The high 32 bits fit usize on every platform Countersign runs on.
        #[allow(clippy::cast_possible_truncation)]
        let high = (self.0 >> 33) as usize;
        high % bound.max(1)
    }
}

fn domain(index: usize) -> String {
    format!("dom{index}")
}

/// Generates a policy of `count` rules. Every 50th rule has no capability prefix (every 100th applies to
/// every action, the others name one agent); the rest cycle through the kinds.
fn policy_text(count: usize) -> String {
    let mut rng = Lcg(42);
    let mut text = String::from(
        "version: 1\ndefaults: { effect: allow }\n\
         capabilities:\n  \"*\": { reversible: true, external: false }\n  dom1.*: { reversible: false, external: true }\n\
         rules:\n",
    );
    for i in 0..count {
        let d = domain(rng.next(DOMAINS));
        let verb = VERBS[rng.next(VERBS.len())];
        let entity = ENTITIES[rng.next(ENTITIES.len())];
        let rule = if i % 50 == 49 {
            if i % 100 == 99 {
                format!(
                    "  - {{ name: r{i}, effect: deny, conditions: {{ capability: \"*.delete.*\", params: {{ force: {{ eq: true }} }} }} }}\n"
                )
            } else {
                format!("  - {{ name: r{i}, effect: require_approval, conditions: {{ agent: suspicious-bot-{i} }} }}\n")
            }
        } else {
            match i % 6 {
                0 => format!(
                    "  - {{ name: r{i}, effect: require_approval, conditions: {{ capability: {d}.{verb}.{entity} }} }}\n"
                ),
                1 => format!(
                    "  - {{ name: r{i}, priority: {}, effect: require_approval, conditions: {{ capability: \"{d}.*\", \
                     params: {{ amount_cents: {{ gt: {} }}, currency: {{ in: [USD, EUR, GBP] }} }} }} }}\n",
                    rng.next(20),
                    100_000 + rng.next(1_000_000)
                ),
                2 => format!(
                    "  - {{ name: r{i}, effect: deny, conditions: {{ capability: \"{d}.*\", \
                     content_patterns: [\"wire\\\\s+transfer\\\\s+{i}\", \"password\\\\s*[:=]\\\\s*{i}\", \"(?:ssn|social security)\\\\s+{i}\"] }} }}\n"
                ),
                3 => format!(
                    "  - {{ name: r{i}, effect: require_approval, conditions: {{ agent: [bot-{i}, \"team-{i}-*\"], capability: \"{d}.{verb}.*\" }} }}\n"
                ),
                4 => format!(
                    "  - {{ name: r{i}, effect: require_approval, conditions: {{ capability: \"{d}.{verb}.*\", first_use: true, risk_at_least: 0.{} }} }}\n",
                    5 + rng.next(5)
                ),
                _ => format!(
                    "  - {{ name: r{i}, effect: require_approval, conditions: {{ capability: llm.chat.completion, \
                     models: [\"gpt-4*\", \"claude-3-opus*\"], max_tokens_threshold: {} }} }}\n",
                    10_000 + rng.next(100_000)
                ),
            }
        };
        text.push_str(&rule);
    }
    // The rule the "late match" action hits: last in file order, highest priority number.
    text.push_str(
        "  - { name: late-match, priority: 100, effect: require_approval, conditions: { capability: \"dom7.*\", \
         params: { amount_cents: { gt: 10 } } } }\n",
    );
    text
}

fn email_params(amount_cents: u64) -> Value {
    let body = "Hi Bob, following up on the quarterly report. The numbers look fine, but please double-check \
                the export before Friday; the totals in the last sheet do not add up to the summary. Also, the \
                customer asked whether we can move the call to Thursday afternoon. Thanks, Alice. "
        .repeat(3);
    json!({
        "to": ["bob@example.com", "carol@example.com"],
        "subject": "Quarterly report follow-up",
        "body": body,
        "amount_cents": amount_cents,
        "currency": "CHF",
        "metadata": {"thread": "abc-123", "labels": ["finance", "q3"], "priority": 2},
    })
}

fn bench_policy(c: &mut Criterion, rules: usize) {
    let text = policy_text(rules);
    let started = std::time::Instant::now();
    let policy = match Policy::from_source("bench.yaml", &text) {
        Ok(policy) => policy,
        Err(error) => {
            eprintln!("benchmark policy does not load: {error}");
            std::process::exit(1);
        }
    };
    let load_time = started.elapsed();
    let Ok(capability) = Capability::parse("dom7.send.newsletter") else {
        eprintln!("benchmark capability does not parse");
        std::process::exit(1);
    };
    let facts = Facts { prior_successes: 3 };
    let late = email_params(5_000);
    let none = email_params(0);
    let late_input = EvalInput { agent: "mailer-bot", capability: &capability, params: &late, facts: &facts };
    let none_input = EvalInput { agent: "mailer-bot", capability: &capability, params: &none, facts: &facts };

    let late_verdict = policy.evaluate(&late_input);
    let none_verdict = policy.evaluate(&none_input);
    eprintln!(
        "{rules} rules ({} KiB of YAML) loaded in {:?}; late action -> {} ({:?}); unmatched action -> {} ({:?})",
        text.len() / 1024,
        load_time,
        late_verdict.rule,
        late_verdict.effect,
        none_verdict.rule,
        none_verdict.effect
    );

    let mut group = c.benchmark_group(format!("evaluate_{rules}_rules"));
    group.bench_function("late_match", |b| b.iter(|| policy.evaluate(black_box(&late_input))));
    group.bench_function("no_match", |b| b.iter(|| policy.evaluate(black_box(&none_input))));
    group.finish();
}

fn evaluate(c: &mut Criterion) {
    bench_policy(c, 100);
    bench_policy(c, 10_000);
}

criterion_group!(benches, evaluate);
criterion_main!(benches);
