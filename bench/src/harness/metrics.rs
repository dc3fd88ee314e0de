//! What the daemon under test says in `/metrics`, parsed.

use std::collections::BTreeMap;

use anyhow::Result;
use trustdrift_testkit::Daemon;

/// `/metrics` of a daemon under test, parsed.
pub trait Scrape {
    fn scrape(&self) -> Result<Metrics>;
}

impl Scrape for Daemon {
    fn scrape(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.api().get_ok("/metrics")?))
    }
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `/metrics`, parsed.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(parse_sample).collect())
    }

    /// Samples of `name` carrying every label of `matching`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        matching: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0
            .iter()
            .filter(move |s| s.name == name && matching.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// Sum of the samples of `name` carrying every label of `matching` (0 if none: a
    /// family with nothing to count has no series).
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.samples(name, matching).map(|s| s.value).sum()
    }

    /// `trustdrift_events_lost_total` by reason.
    pub fn lost(&self) -> BTreeMap<String, u64> {
        self.samples("trustdrift_events_lost_total", &[])
            .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value as u64)))
            .collect()
    }

    /// `trustdrift_events_total{kind}`.
    pub fn events(&self, kind: &str) -> u64 {
        self.sum("trustdrift_events_total", &[("kind", kind)]) as u64
    }

    /// `trustdrift_tracked{what}`.
    pub fn tracked(&self, what: &str) -> u64 {
        self.sum("trustdrift_tracked", &[("what", what)]) as u64
    }
}

/// Per-reason growth of a loss counter between two scrapes; only reasons that grew.
pub fn lost_between(before: &Metrics, after: &Metrics) -> BTreeMap<String, u64> {
    let b = before.lost();
    after
        .lost()
        .into_iter()
        .map(|(reason, n)| {
            let was = b.get(&reason).copied().unwrap_or(0);
            (reason, n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` → the labels and `rest`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &after_key[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_escaped_labels() {
        let m = Metrics::parse(
            "# HELP x\n\
             trustdrift_events_total{kind=\"access\"} 12\n\
             trustdrift_stale_processes{kind=\"ca\",comm=\"a \\\"b\\\",c\"} 2\n\
             trustdrift_ready 1\n",
        );
        assert_eq!(m.events("access"), 12);
        let stale: Vec<&Sample> = m.samples("trustdrift_stale_processes", &[]).collect();
        assert_eq!(stale[0].label("comm"), Some("a \"b\",c"));
        assert_eq!(stale[0].value, 2.0);
        assert_eq!(m.sum("trustdrift_ready", &[]), 1.0);
    }
}
