//! The rule index: which rules could possibly apply to a capability, in decision order, without looking at
//! every rule.
//!
//! Rules are numbered by rank (their position in decision order: priority ascending, then file order). Each
//! rule with a capability condition is filed under the literal dotted prefix of each of its globs: the whole
//! name for a literal (`finance.issue.card`), the complete parts before the first `*` otherwise (`finance`
//! for `finance.*` or `finance.is*`, `finance.issue` for `finance.issue.*`). Rules whose capability globs
//! have no such prefix (`*.delete.*`, `fin*`) or that have no capability condition are unanchored; among
//! those, a rule whose agent condition lists only literal names (`agent: deployment-bot`) is filed under each
//! name, the others go to the list every action is checked against. An action of agent `x` on capability
//! `a.b.c` is looked up under `a`, `a.b`, `a.b.c`, agent `x` and the everyone list; those lists are sorted by
//! rank and merged lazily, so evaluation stops at the first matching rule.
//!
//! The index narrows candidates; it never decides. A candidate still has its conditions (its capability
//! globs included) checked in full, so an index that files a rule too widely costs time, never correctness.
//! The only correctness duty is not to leave a rule out, which holds because a capability matched by a glob
//! starts with the glob's literal prefix, hence with that prefix's complete parts followed by a dot.

use std::collections::HashMap;

use super::glob::Glob;
use crate::capability::NameGlob;

#[derive(Debug, Default)]
pub(crate) struct RuleIndex {
    by_prefix: HashMap<String, Vec<u32>>,
    unanchored_by_agent: HashMap<String, Vec<u32>>,
    unanchored: Vec<u32>,
}

fn push_rank(list: &mut Vec<u32>, rank: u32) {
    if list.last() != Some(&rank) {
        list.push(rank);
    }
}

/// The key a glob is filed under, or `None` when it has no literal dotted prefix.
fn anchor(glob: &NameGlob) -> Option<&str> {
    if glob.is_literal() {
        return Some(glob.as_str());
    }
    let prefix = glob.literal_prefix();
    prefix.rfind('.').map(|dot| &prefix[..dot]).filter(|anchor| !anchor.is_empty())
}

impl RuleIndex {
    /// The n-th item is (capability condition, agent condition) of the rule with rank n (`None`: no such
    /// condition). Ranks above `u32::MAX` are not representable; the compiler refuses such policies first.
    pub fn build<'a>(rules: impl Iterator<Item = (Option<&'a [Glob]>, Option<&'a [Glob]>)>) -> Self {
        let mut index = RuleIndex::default();
        for (rank, (capability, agent)) in rules.enumerate() {
            let Ok(rank) = u32::try_from(rank) else { break };
            let anchors: Option<Vec<&str>> =
                capability.and_then(|globs| globs.iter().map(|g| anchor(g.as_name_glob())).collect());
            let agents: Option<Vec<&str>> = agent
                .filter(|globs| globs.iter().all(|g| g.as_name_glob().is_literal()))
                .map(|globs| globs.iter().map(|g| g.as_name_glob().as_str()).collect());
            match (anchors, agents) {
                (Some(anchors), _) => {
                    for key in anchors {
                        push_rank(index.by_prefix.entry(key.to_owned()).or_default(), rank);
                    }
                }
                (None, Some(agents)) => {
                    for name in agents {
                        push_rank(index.unanchored_by_agent.entry(name.to_owned()).or_default(), rank);
                    }
                }
                (None, None) => index.unanchored.push(rank),
            }
        }
        index
    }

    /// Every rank list, in a fixed order: the everyone list, then by agent, then by capability prefix.
    pub fn lists(&self) -> Vec<&[u32]> {
        fn sorted(map: &HashMap<String, Vec<u32>>) -> Vec<&[u32]> {
            let mut keyed: Vec<(&String, &Vec<u32>)> = map.iter().collect();
            keyed.sort_by(|a, b| a.0.cmp(b.0));
            keyed.into_iter().map(|(_, list)| list.as_slice()).collect()
        }
        let mut lists = vec![self.unanchored.as_slice()];
        lists.extend(sorted(&self.unanchored_by_agent));
        lists.extend(sorted(&self.by_prefix));
        lists
    }

    /// Ranks of the rules that could apply to `agent` acting on `capability`, ascending, each once.
    pub fn candidates<'i>(&'i self, agent: &str, capability: &str) -> Candidates<'i> {
        let mut lists: Vec<&'i [u32]> = Vec::with_capacity(6);
        if !self.unanchored.is_empty() {
            lists.push(&self.unanchored);
        }
        if let Some(list) = self.unanchored_by_agent.get(agent) {
            lists.push(list);
        }
        let dots = capability.match_indices('.').map(|(i, _)| i).chain(std::iter::once(capability.len()));
        for end in dots {
            if let Some(list) = capability.get(..end).and_then(|key| self.by_prefix.get(key)) {
                lists.push(list);
            }
        }
        Candidates { lists, last: None }
    }
}

/// Lazy k-way merge of a few sorted rank lists.
pub(crate) struct Candidates<'i> {
    lists: Vec<&'i [u32]>,
    last: Option<u32>,
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        loop {
            let (which, &rank) = self
                .lists
                .iter()
                .enumerate()
                .filter_map(|(i, list)| list.first().map(|r| (i, r)))
                .min_by_key(|(_, r)| **r)?;
            if let Some(list) = self.lists.get_mut(which) {
                *list = list.get(1..).unwrap_or_default();
            }
            if self.last != Some(rank) {
                self.last = Some(rank);
                return Some(rank as usize);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(patterns: &[&str]) -> Vec<Glob> {
        patterns.iter().filter_map(|p| NameGlob::parse(p).ok()).map(Glob::new).collect()
    }

    #[test]
    fn anchors() {
        let cases = [
            ("finance.issue.card", Some("finance.issue.card")),
            ("finance.*", Some("finance")),
            ("finance.is*", Some("finance")),
            ("finance.issue.*", Some("finance.issue")),
            ("fin*", None),
            ("*.delete.*", None),
            ("*", None),
        ];
        for (pattern, expected) in cases {
            let glob = NameGlob::parse(pattern).map_err(|e| e.to_string());
            assert_eq!(glob.as_ref().map(|g| anchor(g)), Ok(expected), "{pattern}");
        }
    }

    #[test]
    fn candidates_are_merged_in_rank_order_without_duplicates() {
        let rules = [
            (Some(globs(&["email.*"])), None),
            (None, None),
            (Some(globs(&["finance.*", "finance.issue.*"])), Some(globs(&["bot"]))),
            (Some(globs(&["*.issue.card"])), None),
            (Some(globs(&["finance.issue.card"])), None),
            (Some(globs(&["finance.pay.*"])), None),
            (None, Some(globs(&["bot", "other"]))),
            (None, Some(globs(&["bot", "deploy-*"]))),
        ];
        let index = RuleIndex::build(rules.iter().map(|(c, a)| (c.as_deref(), a.as_deref())));
        let candidates = |agent: &str, capability: &str| index.candidates(agent, capability).collect::<Vec<_>>();
        assert_eq!(candidates("x", "finance.issue.card"), [1, 2, 3, 4, 7]);
        assert_eq!(candidates("bot", "finance.issue.card"), [1, 2, 3, 4, 6, 7]);
        assert_eq!(candidates("x", "email.send.message"), [0, 1, 3, 7]);
        assert_eq!(candidates("other", "crm.read.contact"), [1, 3, 6, 7]);
    }
}
