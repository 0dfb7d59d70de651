//! The composite risk score of one action: how much harm it could do, and how much precedent there is for it.
//!
//! The score reads two things only: the capability's risk profile from the policy (`capabilities:`), and how
//! many times this agent has already had this capability succeed. It does not look at parameters, amounts or
//! content (rules do that with `params` and `content_patterns`), it does not count successes (the gateway
//! asks the store and passes the number in), and it decides nothing: policies compare it with
//! `risk_at_least`, and approvers read it next to the action.
//!
//! # Formula
//!
//! ```text
//! inherent   = 0.20                              base: every consequential action carries some risk
//!            + 0.45  if the action is irreversible
//!            + 0.35  if its effect is visible outside the organisation
//!            + 0.10  if the capability has no risk profile at all (unknown, so a little higher)
//! precedent  = 1 / (1 + prior_successes / 2)     1 on first use, 0.5 after two successes, 0.2 after eight
//! score      = clamp(inherent × precedent, 0, 1)
//! ```
//!
//! So an irreversible, external capability on first use scores 1.0; a reversible internal one scores 0.2 on
//! first use; and every score halves after two earlier successes. The score rises with irreversibility and
//! external visibility and never rises with more successes. `factors` spells out each term that applied.

use serde::{Deserialize, Serialize};

/// Every action starts with this much risk.
pub const BASE_RISK: f64 = 0.20;
/// Added when the capability's profile says `reversible: false`.
pub const IRREVERSIBLE_RISK: f64 = 0.45;
/// Added when the capability's profile says `external: true`.
pub const EXTERNAL_RISK: f64 = 0.35;
/// Added when no profile in the policy covers the capability.
pub const UNPROFILED_RISK: f64 = 0.10;

/// What the policy says about a capability's consequences (`capabilities:` in the policy file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityProfile {
    /// Can the effect be undone (a refund, a delete, a rollback)? Defaults to true when a profile omits it.
    pub reversible: bool,
    /// Is the effect visible outside the organisation (money moves, mail leaves, a vendor is called)?
    /// Defaults to false when a profile omits it.
    pub external: bool,
}

impl Default for CapabilityProfile {
    fn default() -> Self {
        Self { reversible: true, external: false }
    }
}

/// The score and the facts it was computed from, stored with the verdict and shown to approvers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskAssessment {
    /// Composite score in `0.0..=1.0`; higher is riskier.
    pub score: f64,
    pub reversible: bool,
    pub external: bool,
    /// Earlier successful executions of this capability by this agent.
    pub prior_successes: u64,
    /// One line per term of the formula that applied, in the order they were applied.
    pub factors: Vec<String>,
}

/// Scores an action from its capability's profile (`None` when the policy has none for it) and the number
/// of earlier successes of this agent on this capability. See the module documentation for the formula.
/// Earlier successes are counted up to this many: counting is a range scan, and an agent with a hundred
/// thousand calls of one capability would pay for it on every submission. Past the cap the precedent factor
/// is at most 1/51 and falls by less than 0.02 more, so the score stays as high or higher (never lower)
/// than an exact count would make it.
pub const PRECEDENT_CAP: u64 = 100;

pub fn assess(profile: Option<&CapabilityProfile>, prior_successes: u64) -> RiskAssessment {
    let mut factors = Vec::with_capacity(4);
    let mut inherent = BASE_RISK;
    factors.push(format!("base {BASE_RISK:.2}"));
    let (reversible, external) = match profile {
        Some(profile) => (profile.reversible, profile.external),
        None => {
            inherent += UNPROFILED_RISK;
            factors.push(format!(
                "no risk profile for this capability (assumed reversible and internal) +{UNPROFILED_RISK:.2}"
            ));
            (true, false)
        }
    };
    if !reversible {
        inherent += IRREVERSIBLE_RISK;
        factors.push(format!("irreversible +{IRREVERSIBLE_RISK:.2}"));
    }
    if external {
        inherent += EXTERNAL_RISK;
        factors.push(format!("externally visible +{EXTERNAL_RISK:.2}"));
    }
    // u64 -> f64 loses precision only above 2^53 successes, where the factor is ~0 either way.
    #[allow(clippy::cast_precision_loss)]
    let precedent = 1.0 / (1.0 + prior_successes as f64 / 2.0);
    if prior_successes == 0 {
        factors.push("first use: no earlier success of this agent on this capability ×1.00".to_owned());
    } else {
        factors.push(format!(
            "{prior_successes}{} earlier success{} of this agent on this capability ×{precedent:.2} (1 / (1 + n/2))",
            if prior_successes >= PRECEDENT_CAP { " or more" } else { "" },
            if prior_successes == 1 { "" } else { "es" }
        ));
    }
    let score = (inherent * precedent).clamp(0.0, 1.0);
    RiskAssessment { score, reversible, external, prior_successes, factors }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extremes_and_monotonicity() {
        let dangerous = CapabilityProfile { reversible: false, external: true };
        let benign = CapabilityProfile::default();
        assert!((assess(Some(&dangerous), 0).score - 1.0).abs() < 1e-9);
        assert!((assess(Some(&benign), 0).score - BASE_RISK).abs() < 1e-9);
        let mut last = f64::INFINITY;
        for successes in [0, 1, 2, 5, 100, u64::MAX] {
            let score = assess(Some(&dangerous), successes).score;
            assert!(score <= last && (0.0..=1.0).contains(&score), "{successes}: {score}");
            last = score;
        }
    }
}
