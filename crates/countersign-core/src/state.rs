//! The action and approval state machines. Every state change in the product goes through
//! [`ActionState::transition`] or [`ApprovalStatus::transition`]; an invalid one is refused with the state the
//! object is in, which the HTTP layer answers as 409.
//!
//! This module decides only whether a move is legal; it does not write anything or emit audit events.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    Submitted,
    PendingApproval,
    Approved,
    Executing,
    Succeeded,
    Failed,
    Denied,
    Expired,
    Cancelled,
}

impl ActionState {
    pub const ALL: [ActionState; 9] = [
        ActionState::Submitted,
        ActionState::PendingApproval,
        ActionState::Approved,
        ActionState::Executing,
        ActionState::Succeeded,
        ActionState::Failed,
        ActionState::Denied,
        ActionState::Expired,
        ActionState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionState::Submitted => "submitted",
            ActionState::PendingApproval => "pending_approval",
            ActionState::Approved => "approved",
            ActionState::Executing => "executing",
            ActionState::Succeeded => "succeeded",
            ActionState::Failed => "failed",
            ActionState::Denied => "denied",
            ActionState::Expired => "expired",
            ActionState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the action can still change. `approved` is terminal only for record-only actions (no
    /// target), so the caller says whether the action has a target.
    pub fn is_terminal(self, has_target: bool) -> bool {
        match self {
            ActionState::Succeeded
            | ActionState::Failed
            | ActionState::Denied
            | ActionState::Expired
            | ActionState::Cancelled => true,
            ActionState::Approved => !has_target,
            ActionState::Submitted | ActionState::PendingApproval | ActionState::Executing => false,
        }
    }

    /// The one place that says which moves are legal.
    pub fn transition(self, to: ActionState) -> Result<ActionState, InvalidTransition> {
        use ActionState::*;
        let legal = matches!(
            (self, to),
            (Submitted, Denied | PendingApproval | Approved)
                | (PendingApproval, Approved | Denied | Expired | Cancelled)
                | (Approved, Executing | Failed)
                | (Executing, Succeeded | Failed | Executing)
        );
        if legal { Ok(to) } else { Err(InvalidTransition { from: self.as_str(), to: to.as_str() }) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
}

impl ApprovalStatus {
    pub const ALL: [ApprovalStatus; 5] = [
        ApprovalStatus::Pending,
        ApprovalStatus::Approved,
        ApprovalStatus::Denied,
        ApprovalStatus::Expired,
        ApprovalStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Only a pending approval moves, and only to a decided status.
    pub fn transition(self, to: ApprovalStatus) -> Result<ApprovalStatus, InvalidTransition> {
        if self == ApprovalStatus::Pending && to != ApprovalStatus::Pending {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self.as_str(), to: to.as_str() })
        }
    }
}

/// Where a job is. `queued` and `running` move; the other three are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// A job runs (again, after a retry or a lost lease) or ends; an ended job never moves.
    pub fn transition(self, to: JobState) -> Result<JobState, InvalidTransition> {
        use JobState::*;
        let legal = matches!(
            (self, to),
            (Queued, Running | Cancelled) | (Running, Queued | Running | Succeeded | Failed | Cancelled)
        );
        if legal { Ok(to) } else { Err(InvalidTransition { from: self.as_str(), to: to.as_str() }) }
    }
}

/// A move the state machine does not allow; `from` is the object's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot move from `{from}` to `{to}`")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "approve" => Some(Decision::Approve),
            "deny" => Some(Decision::Deny),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_of_action_states() {
        use ActionState::*;
        let legal = [
            (Submitted, Denied),
            (Submitted, PendingApproval),
            (Submitted, Approved),
            (PendingApproval, Approved),
            (PendingApproval, Denied),
            (PendingApproval, Expired),
            (PendingApproval, Cancelled),
            (Approved, Executing),
            (Approved, Failed),
            (Executing, Succeeded),
            (Executing, Failed),
            (Executing, Executing),
        ];
        for from in ActionState::ALL {
            for to in ActionState::ALL {
                assert_eq!(from.transition(to).is_ok(), legal.contains(&(from, to)), "{from:?} -> {to:?}");
            }
            assert_eq!(ActionState::parse(from.as_str()), Some(from));
        }
    }

    #[test]
    fn ended_jobs_never_move() {
        for from in JobState::ALL {
            for to in JobState::ALL {
                if from.is_terminal() {
                    assert!(from.transition(to).is_err(), "{from:?} -> {to:?}");
                }
            }
            assert_eq!(JobState::parse(from.as_str()), Some(from));
        }
        assert!(JobState::Queued.transition(JobState::Succeeded).is_err());
        assert!(JobState::Running.transition(JobState::Queued).is_ok());
    }

    #[test]
    fn only_pending_approvals_move() {
        for from in ApprovalStatus::ALL {
            for to in ApprovalStatus::ALL {
                let legal = from == ApprovalStatus::Pending && to != ApprovalStatus::Pending;
                assert_eq!(from.transition(to).is_ok(), legal);
            }
        }
    }
}
