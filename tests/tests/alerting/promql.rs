//! What a PromQL expression refers to: the metrics it selects (with their label matchers)
//! and the labels it groups or matches on. Enough of PromQL for the rules and panels
//! trustdrift ships; anything it does not understand (a function that invents or renames
//! labels, a Grafana variable outside a string) is a panic, so the coverage check fails
//! closed instead of missing a reference. Whether an expression is valid PromQL is
//! promtool's job, not this module's.

use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

#[derive(Debug, Default)]
pub struct References {
    pub selectors: Vec<Selector>,
    /// Labels named by `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    pub grouping: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number,
    Punct(&'static str),
}

const AGGREGATIONS: &[&str] = &[
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "bottomk", "topk", "quantile",
];

/// Functions that only transform values: the labels of their result are their input's.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "delta",
    "deriv",
    "exp",
    "floor",
    "idelta",
    "increase",
    "irate",
    "last_over_time",
    "max_over_time",
    "min_over_time",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
];

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];

/// Grafana's interval variables, as durations promtool and this reader accept.
pub fn substitute_grafana_intervals(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("${__rate_interval}", "5m")
        .replace("$__interval", "1m")
        .replace("${__interval}", "1m")
        .replace("$__range", "1h")
}

fn lex(expr: &str) -> Vec<Token> {
    const PUNCT: &[&str] = &[
        "==", "!=", "=~", "!~", "<=", ">=", "{", "}", "(", ")", "[", "]", ",", "=", "<", ">", "+",
        "-", "*", "/", "%", "^", "@", ":",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in {expr}");
            i += 1;
            out.push(Token::Str(s));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Token::Number);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if ["inf", "nan", "Inf", "NaN"].contains(&word.as_str()) {
                out.push(Token::Number);
            } else {
                out.push(Token::Ident(word));
            }
        } else if c == '$' {
            panic!("a template variable outside a string in {expr}: substitute it first");
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let p = PUNCT
                .iter()
                .find(|p| rest.starts_with(**p))
                .unwrap_or_else(|| panic!("unexpected {c:?} in {expr}"));
            i += p.chars().count();
            out.push(Token::Punct(p));
        }
    }
    out
}

/// The matchers of a `{...}` starting at `tokens[*i]` (the `{`); leaves `*i` after `}`.
fn matchers(tokens: &[Token], i: &mut usize, expr: &str) -> Vec<Matcher> {
    assert_eq!(tokens[*i], Token::Punct("{"));
    *i += 1;
    let mut out = Vec::new();
    loop {
        match &tokens[*i..] {
            [Token::Punct("}"), ..] => {
                *i += 1;
                return out;
            }
            [Token::Punct(","), ..] => *i += 1,
            [Token::Ident(label), Token::Punct(op), Token::Str(value), ..]
                if ["=", "!=", "=~", "!~"].contains(op) =>
            {
                out.push(Matcher {
                    label: label.clone(),
                    op: (*op).to_owned(),
                    value: value.clone(),
                });
                *i += 3;
            }
            rest => panic!("cannot read the matchers at {rest:?} in {expr}"),
        }
    }
}

/// Everything `expr` refers to (after [`substitute_grafana_intervals`]).
pub fn references(expr: &str) -> References {
    let tokens = lex(expr);
    let mut refs = References::default();
    let mut i = 0;
    while i < tokens.len() {
        let next = tokens.get(i + 1);
        match &tokens[i] {
            Token::Ident(word) if GROUPING.contains(&word.as_str()) => {
                i += 1;
                if tokens.get(i) == Some(&Token::Punct("(")) {
                    i += 1;
                    while tokens.get(i) != Some(&Token::Punct(")")) {
                        match tokens.get(i) {
                            Some(Token::Ident(label)) => {
                                refs.grouping.insert(label.clone());
                            }
                            Some(Token::Punct(",")) => {}
                            other => panic!("unexpected {other:?} in a label list of {expr}"),
                        }
                        i += 1;
                    }
                    i += 1;
                }
            }
            Token::Ident(word) if KEYWORDS.contains(&word.as_str()) => i += 1,
            Token::Ident(word)
                if (AGGREGATIONS.contains(&word.as_str())
                    || FUNCTIONS.contains(&word.as_str()))
                    && matches!(next, Some(Token::Punct("(")))
                    || AGGREGATIONS.contains(&word.as_str())
                        && matches!(next, Some(Token::Ident(w)) if w == "by" || w == "without") =>
            {
                i += 1
            }
            Token::Ident(word) if matches!(next, Some(Token::Punct("("))) => panic!(
                "{word}() in {expr}: this checker does not know which labels it keeps or \
                 makes; teach tests/tests/alerting/promql.rs about it"
            ),
            Token::Ident(metric) => {
                i += 1;
                let matchers = if tokens.get(i) == Some(&Token::Punct("{")) {
                    matchers(&tokens, &mut i, expr)
                } else {
                    vec![]
                };
                refs.selectors.push(Selector {
                    metric: metric.clone(),
                    matchers,
                });
            }
            Token::Punct("{") => {
                let matchers = matchers(&tokens, &mut i, expr);
                let metric = matchers
                    .iter()
                    .find(|m| m.label == "__name__" && m.op == "=")
                    .map(|m| m.value.clone())
                    .unwrap_or_else(|| panic!("a selector without a metric name in {expr}"));
                refs.selectors.push(Selector { metric, matchers });
            }
            Token::Punct("[") => {
                while tokens.get(i) != Some(&Token::Punct("]")) {
                    assert!(i < tokens.len(), "unterminated [ in {expr}");
                    i += 1;
                }
                i += 1;
            }
            Token::Str(_) => panic!("a string outside a selector in {expr}"),
            Token::Number | Token::Punct(_) => i += 1,
        }
    }
    refs
}

/// Grafana's `label_values(selector, label)` (or `label_values(label)`): the selector's
/// references, and the label.
pub fn label_values(query: &str) -> (References, String) {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values() query: {query}"));
    match inner.rsplit_once(',') {
        Some((selector, label)) => (references(selector), label.trim().to_owned()),
        None => (References::default(), inner.trim().to_owned()),
    }
}

/// The `{{label}}` names in a Grafana legend or annotation format.
pub fn format_labels(format: &str) -> BTreeSet<String> {
    format
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(name, _)| name.trim().to_owned())
        .collect()
}

/// The `$labels.name` references in an alert's annotation or label template.
pub fn template_labels(template: &str) -> BTreeSet<String> {
    template
        .split("$labels.")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(r: &References) -> Vec<&str> {
        r.selectors.iter().map(|s| s.metric.as_str()).collect()
    }

    #[test]
    fn selectors_grouping_and_functions_are_told_apart() {
        let r = references(&substitute_grafana_intervals(
            "sum by (node, reason) (increase(trustdrift_events_lost_total{node=~\"$node\", \
             reason!=\"x\"}[$__rate_interval])) / on (node) group_left(store) \
             max without (pid) (a_total offset 5m) or vector(0) > bool 1",
        ));
        assert_eq!(names(&r), ["trustdrift_events_lost_total", "a_total"]);
        assert_eq!(
            r.grouping.iter().map(String::as_str).collect::<Vec<_>>(),
            ["node", "pid", "reason", "store"]
        );
        assert_eq!(
            r.selectors[0].matchers[1],
            Matcher {
                label: "reason".into(),
                op: "!=".into(),
                value: "x".into()
            }
        );
    }

    #[test]
    #[should_panic(expected = "label_replace")]
    fn a_function_that_makes_labels_is_refused() {
        references("label_replace(up, \"a\", \"$1\", \"b\", \"(.*)\")");
    }

    #[test]
    fn grafana_queries_and_templates_name_their_labels() {
        let (r, label) =
            label_values("label_values(trustdrift_stale_processes{node=~\"$node\"}, pod)");
        assert_eq!(
            (names(&r), label.as_str()),
            (vec!["trustdrift_stale_processes"], "pod")
        );
        assert_eq!(
            format_labels("{{namespace}}/{{ pod }} on {{node}}"),
            ["namespace", "node", "pod"].map(String::from).into()
        );
        assert_eq!(
            template_labels(
                "{{ if $labels.pod }}{{ $labels.namespace }}/{{ $labels.pod }}{{ end }}"
            ),
            ["namespace", "pod"].map(String::from).into()
        );
    }
}
