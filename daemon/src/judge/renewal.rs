//! Renewals: which certificate on disk now takes the place of one a process holds in
//! memory.
//!
//! A certificate on disk **renews** one held when it names the same subject, expires
//! later, is the same kind (CA or not), and either has the same key (SubjectPublicKeyInfo:
//! a renewal that kept its key, as cert-manager's `rotationPolicy: Never` and most CA
//! re-issues do) or the same issuer (a renewal with a new key, by the CA that signed the
//! old one; a self-signed root re-keyed under its own name is one too). Nothing else is a
//! renewal: an expired root that a `ca-certificates` upgrade merely removed has no
//! successor on disk, so a process still holding it is stale at most, never "expired in
//! memory" — nothing was renewed behind its back, nothing is down because of it.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use crate::stores::formats::CertInfo;

/// What ties a renewal to the certificate it renews.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// Same subject, same key.
    SameKey,
    /// Same subject, same issuer, a new key.
    SameIssuer,
}

/// How `new` renews `old`, if it does.
pub fn renews(new: &CertInfo, old: &CertInfo) -> Option<Match> {
    if new.sha256 == old.sha256
        || new.subject != old.subject
        || new.is_ca != old.is_ca
        || new.not_after <= old.not_after
    {
        return None;
    }
    if !old.spki_sha256.is_empty() && new.spki_sha256 == old.spki_sha256 {
        return Some(Match::SameKey);
    }
    // An empty subject (a SAN-only leaf) names nobody: only its key can tie it to another.
    if !old.subject.is_empty() && new.issuer == old.issuer {
        return Some(Match::SameIssuer);
    }
    None
}

/// A certificate the process holds that is no longer on disk, and its renewal that is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewed {
    pub held: Arc<CertInfo>,
    pub renewal: Arc<CertInfo>,
    pub matched: Match,
}

/// Every certificate in `held` (what the process read) that is gone from `on_disk` while
/// a renewal of it is there, and that renewal (the one that expires last). A renewal the
/// process already holds too does not count: it has the new one in memory as well.
pub fn renewed(
    held: &BTreeMap<String, Arc<CertInfo>>,
    on_disk: &BTreeMap<String, Arc<CertInfo>>,
) -> Vec<Renewed> {
    let gone: Vec<&Arc<CertInfo>> = held
        .iter()
        .filter(|(fp, _)| !on_disk.contains_key(*fp))
        .map(|(_, c)| c)
        .collect();
    if gone.is_empty() {
        return vec![];
    }
    // Candidates by subject: a bundle of hundreds replaced by another is one look-up per
    // certificate gone, not a comparison with every certificate on disk.
    let mut arrived: BTreeMap<&str, Vec<&Arc<CertInfo>>> = BTreeMap::new();
    for (fp, c) in on_disk {
        if !held.contains_key(fp) {
            arrived.entry(c.subject.as_str()).or_default().push(c);
        }
    }
    gone.into_iter()
        .filter_map(|old| {
            arrived
                .get(old.subject.as_str())?
                .iter()
                .filter_map(|new| renews(new, old).map(|m| (*new, m)))
                // The latest expiry wins; at a tie, the same key (a closer match).
                .max_by(|(a, ma), (b, mb)| a.not_after.cmp(&b.not_after).then(mb.cmp(ma)))
                .map(|(new, matched)| Renewed {
                    held: Arc::clone(old),
                    renewal: Arc::clone(new),
                    matched,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;

    fn cert(name: &str, subject: &str, issuer: &str, key: &str, not_after: i64) -> Arc<CertInfo> {
        Arc::new(CertInfo {
            subject: subject.into(),
            issuer: issuer.into(),
            serial: "01".into(),
            sha256: format!("sha-{name}"),
            not_before: 0,
            not_after,
            is_ca: subject == issuer,
            spki_sha256: key.into(),
        })
    }

    fn set(certs: &[&Arc<CertInfo>]) -> BTreeMap<String, Arc<CertInfo>> {
        certs
            .iter()
            .map(|c| (c.sha256.clone(), Arc::clone(c)))
            .collect()
    }

    const LEAF: &str = "CN=proxy.internal";
    const CA: &str = "CN=Issuing CA";

    #[test]
    fn a_leaf_renewed_with_the_same_key_is_matched_by_its_key() {
        let old = cert("old", LEAF, CA, "k1", 2 * DAY);
        // Even re-issued by another CA: the key and the name are the same.
        let new = cert("new", LEAF, "CN=Other CA", "k1", 90 * DAY);
        assert_eq!(renews(&new, &old), Some(Match::SameKey));
        let found = renewed(&set(&[&old]), &set(&[&new]));
        assert_eq!(
            found,
            vec![Renewed {
                held: old,
                renewal: new,
                matched: Match::SameKey
            }]
        );
    }

    #[test]
    fn a_leaf_renewed_with_a_new_key_by_the_same_issuer_is_matched_by_its_issuer() {
        let old = cert("old", LEAF, CA, "k1", 2 * DAY);
        let new = cert("new", LEAF, CA, "k2", 90 * DAY);
        assert_eq!(renews(&new, &old), Some(Match::SameIssuer));
        // A new key from another issuer is someone else's certificate under that name.
        let stranger = cert("x", LEAF, "CN=Other CA", "k3", 90 * DAY);
        assert_eq!(renews(&stranger, &old), None);
        assert!(renewed(&set(&[&old]), &set(&[&stranger])).is_empty());
    }

    #[test]
    fn a_renewal_expires_later_has_the_same_name_and_is_the_same_kind() {
        let old = cert("old", LEAF, CA, "k1", 90 * DAY);
        assert_eq!(renews(&cert("a", LEAF, CA, "k1", 30 * DAY), &old), None);
        assert_eq!(renews(&cert("b", LEAF, CA, "k1", 90 * DAY), &old), None);
        assert_eq!(
            renews(&cert("c", "CN=other", CA, "k1", 99 * DAY), &old),
            None
        );
        let mut ca = (*cert("d", LEAF, CA, "k1", 99 * DAY)).clone();
        ca.is_ca = true;
        assert_eq!(renews(&ca, &old), None);
        assert_eq!(renews(&old, &old), None);
    }

    #[test]
    fn an_unrecorded_key_never_matches_and_an_empty_subject_needs_the_key() {
        let old = cert("old", LEAF, "CN=A", "", DAY);
        assert_eq!(renews(&cert("n", LEAF, "CN=B", "", 9 * DAY), &old), None);
        let anonymous = cert("anon", "", CA, "k1", DAY);
        assert_eq!(renews(&cert("n1", "", CA, "k2", 9 * DAY), &anonymous), None);
        assert_eq!(
            renews(&cert("n2", "", CA, "k1", 9 * DAY), &anonymous),
            Some(Match::SameKey)
        );
    }

    #[test]
    fn a_root_removed_without_a_successor_is_not_renewed() {
        // A ca-certificates upgrade: an expired root goes, other roots stay or arrive.
        let expired_root = cert("gone", "CN=Old Root", "CN=Old Root", "k0", -DAY);
        let kept = cert("kept", "CN=Kept Root", "CN=Kept Root", "k1", 9 * DAY);
        let added = cert("added", "CN=New Root", "CN=New Root", "k2", 99 * DAY);
        assert!(renewed(&set(&[&expired_root, &kept]), &set(&[&kept, &added])).is_empty());
    }

    #[test]
    fn a_root_re_keyed_under_its_own_name_is_renewed() {
        let old = cert("old", "CN=Mesh Root", "CN=Mesh Root", "k0", DAY);
        let new = cert("new", "CN=Mesh Root", "CN=Mesh Root", "k9", 365 * DAY);
        let found = renewed(&set(&[&old]), &set(&[&new]));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].matched, Match::SameIssuer);
    }

    #[test]
    fn nothing_is_renewed_behind_a_process_that_holds_the_renewal_too_or_the_old_one_on_disk() {
        let old = cert("old", LEAF, CA, "k1", 2 * DAY);
        let new = cert("new", LEAF, CA, "k1", 90 * DAY);
        // It read both: it has the renewal in memory.
        assert!(renewed(&set(&[&old, &new]), &set(&[&new])).is_empty());
        // The old one is still on disk beside the new one: not gone.
        assert!(renewed(&set(&[&old]), &set(&[&old, &new])).is_empty());
    }

    #[test]
    fn of_several_renewals_the_one_that_expires_last_is_named() {
        let old = cert("old", LEAF, CA, "k1", 2 * DAY);
        let short = cert("short", LEAF, CA, "k1", 30 * DAY);
        let long = cert("long", LEAF, CA, "k2", 90 * DAY);
        let found = renewed(&set(&[&old]), &set(&[&short, &long]));
        assert_eq!(found[0].renewal, long);
        assert_eq!(found[0].matched, Match::SameIssuer);
    }
}
