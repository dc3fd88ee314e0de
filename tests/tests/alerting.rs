//! The alerting and dashboard contract (dashboards/, deploy/monitoring/, docs/runbooks/),
//! proven with the real tools: promtool checks and unit-tests the rules; every dashboard
//! query is parsed by promtool; every metric and label a rule or a panel queries is one a
//! real daemon exports; and a real Prometheus scrapes the real daemon while a real
//! drift pages through a real Alertmanager and resolves after the remedy.

#[path = "alerting/promql.rs"]
mod promql;
#[path = "alerting/stack.rs"]
mod stack;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    process::Command,
    time::{Duration, Instant},
};

use promql::References;
use stack::{Agent, PodAgent, Webhook, eventually, require};
use trustdrift_e2e::{
    Cert, Daemon, DaemonSetup, TempDir, Value, bundle, python_tls_server, replace_atomically, repo,
};

const RULES: &str = "dashboards/trustdrift.rules.yml";
const RULE_TESTS: &str = "dashboards/trustdrift.rules.test.yml";
const PROMETHEUS_RULE: &str = "deploy/monitoring/prometheusrule.yaml";
const DASHBOARD: &str = "dashboards/trustdrift.json";
const RUNBOOKS: &str = "docs/runbooks/";
const EVENTS_LOST_RUNBOOK: &str = "docs/runbooks/TrustDriftEventsLost.md";

/// Where every runbook_url points, followed by `<alert>.md`: this repository's
/// docs/runbooks/, as published. docs/alerts.md documents it and how to change it.
const RUNBOOK_BASE: &str = "https://github.com/trustdrift/trustdrift/blob/main/docs/runbooks/";

/// The families that carry a process group (kind, confidence, namespace, pod, container,
/// comm).
const GROUP_GAUGES: &[&str] = &[
    "trustdrift_stale_processes",
    "trustdrift_stale_since_timestamp_seconds",
    "trustdrift_expired_in_memory_processes",
    "trustdrift_removed_ca_trusted_processes",
    "trustdrift_stale_certificate_expiration_timestamp_seconds",
];

const DS: &str = "${DS_PROMETHEUS}";

/// The file of this repository a runbook_url links to.
fn runbook_path(url: &str) -> String {
    let page = url
        .strip_prefix(RUNBOOK_BASE)
        .unwrap_or_else(|| panic!("{url} is not under {RUNBOOK_BASE}"));
    format!("{RUNBOOKS}{page}")
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn rules() -> Vec<Value> {
    yaml(RULES)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn alert_names() -> Vec<String> {
    rules()
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p.clone());
        out.extend(p["panels"].as_array().cloned().unwrap_or_default());
    }
    out
}

/// Runs a program to completion; (success, stdout and stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

// --- The rules -------------------------------------------------------------------------

#[test]
fn the_rules_pass_promtool_check() {
    if !require("promtool") {
        return;
    }
    let (ok, report) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join(RULES)));
    assert!(ok, "promtool rejects {RULES}:\n{report}");
    assert!(
        report.contains(&format!("{} rules found", rules().len())),
        "{report}"
    );
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    if !require("promtool") {
        return;
    }
    let (ok, report) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo().join(RULE_TESTS)));
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{report}");

    let checks: Vec<Value> = yaml(RULE_TESTS)["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .collect();
    let fired = |alert: &str, severity: &Value| {
        checks.iter().any(|c| {
            c["alertname"] == alert
                && c["exp_alerts"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| &e["exp_labels"]["severity"] == severity))
        })
    };
    let quiet = |alert: &str| {
        checks.iter().any(|c| {
            c["alertname"] == alert && c["exp_alerts"].as_array().is_some_and(Vec::is_empty)
        })
    };
    let mut untested = Vec::new();
    // An alert with a warning and a critical rule (same name) is shown firing at both.
    for rule in rules() {
        let alert = rule["alert"].as_str().expect("only alerting rules");
        let severity = &rule["labels"]["severity"];
        if !fired(alert, severity) {
            untested.push(format!("{alert} is never tested firing as {severity}"));
        }
        if !quiet(alert) {
            untested.push(format!("{alert} is never tested not firing"));
        }
    }
    assert!(untested.is_empty(), "{RULE_TESTS}: {untested:#?}");
}

#[test]
fn the_prometheusrule_carries_exactly_the_plain_rules() {
    let plain = yaml(RULES);
    let resource = yaml(PROMETHEUS_RULE);
    assert_eq!(resource["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(resource["kind"], "PrometheusRule");
    assert!(resource["metadata"]["name"].is_string(), "{resource}");
    assert!(
        resource["spec"]["groups"] == plain["groups"],
        "{PROMETHEUS_RULE}'s spec.groups differ from {RULES}'s groups: regenerate it with the \
         command in dashboards/README.md"
    );
    let kustomization = yaml("deploy/monitoring/kustomization.yaml");
    assert_eq!(
        kustomization["resources"],
        serde_json::json!(["prometheusrule.yaml"])
    );
}

#[test]
fn every_alert_says_how_bad_it_is_what_to_do_and_links_its_runbook() {
    let mut problems = Vec::new();
    let mut linked = BTreeSet::new();
    for rule in rules() {
        let alert = rule["alert"].as_str().expect("only alerting rules");
        if !["critical", "warning", "info"]
            .contains(&rule["labels"]["severity"].as_str().unwrap_or(""))
        {
            problems.push(format!(
                "{alert}: severity is not critical, warning or info"
            ));
        }
        for annotation in ["summary", "description", "remedy"] {
            if rule["annotations"][annotation]
                .as_str()
                .is_none_or(str::is_empty)
            {
                problems.push(format!("{alert}: no {annotation}"));
            }
        }
        // An absolute link: the one base, then the alert's own page, which this
        // repository has under docs/runbooks/ (docs/alerts.md).
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let expected = format!("{RUNBOOK_BASE}{alert}.md");
        if url != expected {
            problems.push(format!(
                "{alert}: runbook_url {url:?}, expected {expected:?}"
            ));
            continue;
        }
        let path = runbook_path(url);
        match fs::read_to_string(repo().join(&path)) {
            Ok(text) if text.starts_with(&format!("# {alert}\n")) => {
                linked.insert(path);
            }
            Ok(_) => problems.push(format!("{path} does not start with `# {alert}`")),
            Err(e) => problems.push(format!("{alert}: {path}: {e}")),
        }
    }
    assert!(
        RUNBOOK_BASE.starts_with("https://")
            && RUNBOOK_BASE.ends_with(&format!("/{RUNBOOKS}"))
            && !RUNBOOK_BASE.contains("TrustDrift"),
        "{RUNBOOK_BASE}: an https URL of this repository's {RUNBOOKS}, without \"TrustDrift\" \
         (where the kustomize replacement splits it)"
    );
    for (file, what) in [
        ("docs/alerts.md", "the base and how to change it"),
        (RULES, "the base, in its header"),
    ] {
        let text = read(file);
        if text.matches(RUNBOOK_BASE).count() < 1 {
            problems.push(format!("{file} does not document {what}"));
        }
    }
    for entry in fs::read_dir(repo().join(RUNBOOKS)).expect("docs/runbooks") {
        let name = entry.expect("an entry").file_name();
        let path = format!("{RUNBOOKS}{}", name.to_string_lossy());
        if !linked.contains(&path) {
            problems.push(format!("{path} is the runbook of no alert"));
        }
    }
    let index = read("docs/alerts.md");
    for alert in alert_names() {
        if !index.contains(&format!("[{alert}](runbooks/{alert}.md)")) {
            problems.push(format!("docs/alerts.md does not link {alert}'s runbook"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn nothing_pages_on_a_process_whose_reads_trustdrift_did_not_see() {
    for rule in rules() {
        let alert = rule["alert"].as_str().unwrap_or_default();
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        if severity == "info" {
            continue;
        }
        let refs = promql::references(rule["expr"].as_str().expect("expr"));
        for s in refs
            .selectors
            .iter()
            .filter(|s| GROUP_GAUGES.contains(&s.metric.as_str()))
        {
            let confidence: Vec<(&str, &str)> = s
                .matchers
                .iter()
                .filter(|m| m.label == "confidence")
                .map(|m| (m.op.as_str(), m.value.as_str()))
                .collect();
            assert_eq!(
                confidence,
                [("=", "observed")],
                "{alert} ({severity}) selects {} without confidence=\"observed\": it would \
                 page on unverified processes",
                s.metric
            );
        }
    }
}

/// The values a `trustdrift_events_lost_total` reason can take, as docs/metrics.md lists
/// them.
fn documented_loss_reasons() -> BTreeSet<String> {
    let docs = read("docs/metrics.md");
    let row = docs
        .lines()
        .find(|l| l.starts_with("| `trustdrift_events_lost_total` |"))
        .expect("docs/metrics.md documents trustdrift_events_lost_total");
    let meaning = row.rsplit('|').nth(1).expect("a meaning column");
    meaning
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn events_lost_alerts_on_exactly_the_reasons_its_runbook_calls_actionable() {
    let documented = documented_loss_reasons();
    assert!(documented.len() >= 10, "{documented:?}");
    // The runbook's table: | `reason` | side | alerts (yes/no) | ...
    let runbook = read(EVENTS_LOST_RUNBOOK);
    let mut actionable = BTreeSet::new();
    let mut harmless = BTreeSet::new();
    for line in runbook.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let reason = cells[1].trim_matches('`').to_owned();
        match cells[3] {
            "yes" => actionable.insert(reason),
            "no" => harmless.insert(reason),
            other => panic!("{EVENTS_LOST_RUNBOOK}: {reason} alerts {other:?}, not yes or no"),
        };
    }
    let listed: BTreeSet<String> = actionable.union(&harmless).cloned().collect();
    assert_eq!(
        listed, documented,
        "{EVENTS_LOST_RUNBOOK} must list every reason docs/metrics.md documents, and no other"
    );
    // Whatever its name, a reason nothing can be done about must not alert.
    for expected in [
        "path_truncated",
        "path_unreadable",
        "catalog_versions_dropped",
    ] {
        assert!(
            harmless.contains(expected),
            "{expected} is not marked harmless"
        );
    }
    let rule = rules()
        .into_iter()
        .find(|r| r["alert"] == "TrustDriftEventsLost")
        .expect("TrustDriftEventsLost");
    assert!(rule["for"].is_string(), "TrustDriftEventsLost has no for:");
    let refs = promql::references(rule["expr"].as_str().expect("expr"));
    let matchers: Vec<_> = refs
        .selectors
        .iter()
        .filter(|s| s.metric == "trustdrift_events_lost_total")
        .flat_map(|s| s.matchers.iter().filter(|m| m.label == "reason"))
        .collect();
    assert_eq!(matchers.len(), 1, "one reason matcher: {matchers:?}");
    assert_eq!(matchers[0].op, "=~", "a list of the reasons that alert");
    let alerted: BTreeSet<String> = matchers[0].value.split('|').map(str::to_owned).collect();
    assert_eq!(
        alerted, actionable,
        "TrustDriftEventsLost must alert on exactly the reasons its runbook marks actionable"
    );
    // The remedy names what to do for each of them, or at least the runbook.
    let remedy = rule["annotations"]["remedy"].as_str().expect("remedy");
    for reason in &actionable {
        assert!(
            remedy.contains(&format!("\"{reason}\"")),
            "the remedy says nothing particular for {reason}"
        );
    }
}

// --- The dashboard ---------------------------------------------------------------------

/// Every PromQL the dashboard runs: (where, expression, labels its legend names).
fn dashboard_queries(d: &Value) -> Vec<(String, String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            out.push((
                format!("panel {} target {}", p["title"], t["refId"]),
                t["expr"].as_str().unwrap_or_default().to_owned(),
                promql::format_labels(t["legendFormat"].as_str().unwrap_or("")),
            ));
        }
    }
    for a in d["annotations"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if let Some(expr) = a["expr"].as_str() {
            let mut labels = promql::format_labels(a["textFormat"].as_str().unwrap_or(""));
            labels.extend(promql::format_labels(
                a["titleFormat"].as_str().unwrap_or(""),
            ));
            labels.extend(
                a["tagKeys"]
                    .as_str()
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned),
            );
            out.push((
                format!("annotation {:?}", a["name"]),
                expr.to_owned(),
                labels,
            ));
        }
    }
    out
}

/// The columns a table's transformations name, other than values and time: labels of
/// the panel's queries, any of them. (where, the panel's expressions, the columns)
fn table_columns(d: &Value) -> Vec<(String, Vec<String>, BTreeSet<String>)> {
    let mut out = Vec::new();
    for p in panels(d) {
        let mut columns = BTreeSet::new();
        for tr in p["transformations"].as_array().cloned().unwrap_or_default() {
            for key in ["renameByName", "indexByName", "excludeByName"] {
                if let Some(o) = tr["options"][key].as_object() {
                    columns.extend(
                        o.keys()
                            .filter(|k| *k != "Time" && !k.starts_with("Value"))
                            .cloned(),
                    );
                }
            }
        }
        if !columns.is_empty() {
            let exprs = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str().map(str::to_owned))
                .collect();
            out.push((format!("table {}", p["title"]), exprs, columns));
        }
    }
    out
}

/// `expr` as Grafana runs it with every variable at "All" (and intervals at sample
/// values).
fn all_selected(expr: &str) -> String {
    dashboard_variables(promql::substitute_grafana_intervals(expr), ".*")
}

fn dashboard_variables(expr: String, pod: &str) -> String {
    expr.replace("$cluster", ".*")
        .replace("$job", ".*")
        .replace("$node", ".*")
        .replace("$namespace", ".*")
        .replace("$pod", pod)
}

fn query_variables(d: &Value) -> Vec<Value> {
    d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter(|v| v["type"] == "query")
        .cloned()
        .collect()
}

#[test]
fn the_dashboard_imports_anywhere_and_filters_by_cluster_job_node_namespace_and_pod() {
    let d = dashboard();
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };

    // Imported through the UI, Grafana asks for DS_PROMETHEUS; provisioned from a file,
    // the variable of the same name picks a Prometheus at view time.
    check(
        d["__inputs"].as_array().is_some_and(|i| {
            i.iter()
                .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus")
        }),
        "no DS_PROMETHEUS input".into(),
    );
    let vars = d["templating"]["list"].as_array().expect("templating");
    check(
        vars.iter().any(|v| {
            v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"
        }),
        "no DS_PROMETHEUS datasource variable".into(),
    );
    check(
        d["schemaVersion"]
            .as_u64()
            .is_some_and(|v| (36..=41).contains(&v)),
        format!("schemaVersion {}", d["schemaVersion"]),
    );
    check(
        d["uid"].is_string() && d["title"].is_string(),
        "no uid or title".into(),
    );

    let by_name: BTreeMap<String, Value> = query_variables(&d)
        .into_iter()
        .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v))
        .collect();
    // As kube-prometheus' dashboards: a cluster (from a `cluster` label where Prometheus
    // adds one; All, ".*", matches every series where none has it), the scrape jobs with
    // trustdrift targets, whatever they are called, then node, namespace and pod.
    for (name, depends_on) in [
        ("cluster", vec![]),
        ("job", vec!["$cluster"]),
        ("node", vec!["$cluster", "$job"]),
        ("namespace", vec!["$cluster", "$job", "$node"]),
        ("pod", vec!["$cluster", "$job", "$node", "$namespace"]),
    ] {
        let Some(v) = by_name.get(name) else {
            check(false, format!("no {name} variable"));
            continue;
        };
        let query = v["query"].as_str().unwrap_or_default();
        check(
            (v["multi"] == true || name == "cluster")
                && v["includeAll"] == true
                && v["allValue"] == ".*",
            format!("{name}: not multi-valued (cluster excepted) with All = .*"),
        );
        check(
            v["datasource"]["uid"] == DS,
            format!("{name}: datasource {}", v["datasource"]),
        );
        check(
            promql::label_values(query).1 == name,
            format!("{name}: query {query}"),
        );
        for dep in depends_on {
            check(
                query.contains(dep),
                format!("{name} is not narrowed by {dep}: {query}"),
            );
        }
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        check(
            ids.insert(p["id"].to_string()),
            format!("{title}: id {} reused", p["id"]),
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or(u64::MAX));
        check(
            x.saturating_add(w) <= 24 && h > 0,
            format!("{title}: gridPos {g}"),
        );
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            check(!overlap, format!("{title} overlaps {other}"));
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        check(
            p["datasource"]["uid"] == DS,
            format!("{title}: datasource {}", p["datasource"]),
        );
        check(
            p["description"].as_str().is_some_and(|s| s.len() > 20),
            format!("{title}: no description"),
        );
        check(
            p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            format!("{title}: no unit"),
        );
        if p["type"] == "stat" {
            check(
                p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty()),
                format!("{title}: no thresholds"),
            );
            // A family with nothing to count has no series: a stat reads 0, not "No
            // data" (the end-to-end test asks a real Prometheus).
            for t in p["targets"].as_array().into_iter().flatten() {
                check(
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("or vector(0)")),
                    format!("{title}: {} may have no data", t["expr"]),
                );
            }
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        check(!targets.is_empty(), format!("{title}: no query"));
        let mut refs = BTreeSet::new();
        for t in targets {
            check(
                t["datasource"]["uid"] == DS,
                format!("{title}: a target's datasource"),
            );
            check(
                refs.insert(t["refId"].to_string()),
                format!("{title}: refId reused"),
            );
        }
    }

    // Every query honours the filters that apply to what it selects: cluster and job on
    // everything scraped, node on what the daemon labels, namespace and pod on groups.
    let mut queried = BTreeSet::new();
    for (place, expr, _) in dashboard_queries(&d) {
        let refs = promql::references(&promql::substitute_grafana_intervals(&expr));
        for s in &refs.selectors {
            let mut filters = vec![("cluster", "$cluster"), ("job", "$job")];
            if s.metric != "up" {
                filters.push(("node", "$node"));
            }
            if GROUP_GAUGES.contains(&s.metric.as_str()) {
                filters.extend([("namespace", "$namespace"), ("pod", "$pod")]);
            }
            queried.insert(s.metric.clone());
            for (label, var) in filters {
                let filtered = s
                    .matchers
                    .iter()
                    .any(|m| m.label == label && m.op == "=~" && m.value == var);
                check(
                    filtered,
                    format!(
                        "{place}: {} is not filtered by {label}=~\"{var}\"",
                        s.metric
                    ),
                );
            }
        }
    }
    // What the issue asks the dashboard to show.
    for family in [
        "trustdrift_stale_processes",
        "trustdrift_stale_since_timestamp_seconds",
        "trustdrift_expired_in_memory_processes",
        "trustdrift_removed_ca_trusted_processes",
        "trustdrift_store_certificates",
        "trustdrift_store_last_change_timestamp_seconds",
        "trustdrift_events_total",
        "trustdrift_events_lost_total",
        "trustdrift_bpf_program_run_time_seconds_total",
        "trustdrift_probe_attached",
        "trustdrift_stale_certificate_expiration_timestamp_seconds",
    ] {
        check(queried.contains(family), format!("no panel shows {family}"));
    }
    assert!(problems.is_empty(), "{DASHBOARD}: {problems:#?}");
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    if !require("promtool") {
        return;
    }
    // promtool 2.42 parses PromQL only inside rule files: each query becomes a recording
    // rule, with Grafana's variables as they are when "All" is selected.
    let d = dashboard();
    let mut exprs: Vec<(String, String)> = dashboard_queries(&d)
        .into_iter()
        .map(|(place, expr, _)| (place, expr))
        .collect();
    for v in query_variables(&d) {
        let query = v["query"].as_str().unwrap_or_default();
        let selector = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(s, _)| s.to_owned())
            .unwrap_or_default();
        exprs.push((format!("variable {}", v["name"]), selector));
    }
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = all_selected(expr);
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = TempDir::new("dashboard-promql");
    let path = dir.join("dashboard.rules.yml");
    fs::write(&path, serde_norway::to_string(&file).expect("YAML")).expect("writing");
    let (ok, report) = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    let index: Vec<String> = exprs
        .iter()
        .enumerate()
        .map(|(i, (place, expr))| format!("dashboard:query_{i} = {place}: {expr}"))
        .collect();
    assert!(
        ok,
        "promtool rejects a dashboard query:\n{report}\n{}",
        index.join("\n")
    );
    assert!(
        report.contains(&format!("{} rules found", exprs.len())),
        "{report}"
    );
}

// --- Coverage: every metric and label queried is exported ------------------------------

/// metric -> label -> values seen, from a /metrics text (classic format).
type Exported = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_exposition(text: &str) -> Exported {
    let mut out = Exported::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let family = out.entry(line[..name_end].to_owned()).or_default();
        let Some(rest) = line[name_end..].strip_prefix('{') else {
            continue;
        };
        let mut chars = rest.chars();
        loop {
            let label: String = chars.by_ref().take_while(|c| *c != '=').collect();
            let label = label.trim_start_matches(',').trim().to_owned();
            if label.is_empty() || label.starts_with('}') {
                break;
            }
            assert_eq!(chars.next(), Some('"'), "a label value in {line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            family.entry(label).or_default().insert(value);
        }
    }
    out
}

/// Labels Prometheus adds to every series it scrapes: job and instance, and a cluster
/// where it is told to (external labels, relabelling), which the daemon never exports.
const TARGET_LABELS: &[&str] = &["job", "instance", "cluster"];

/// Values of `label` that docs/metrics.md documents and daemon/src/serve/metrics.rs emits, for
/// those no test machine can produce on demand (`confidence="unverified"` needs a process
/// older than the daemon whose CA store changed after it started).
fn documented_values(label: &str) -> BTreeSet<String> {
    let docs = read("docs/metrics.md");
    let source = read("daemon/src/serve/metrics.rs");
    let Some((_, after)) = docs.split_once(&format!("`{label}` (")) else {
        return BTreeSet::new();
    };
    let list = after.split_once(')').map_or("", |(l, _)| l);
    list.split(',')
        .map(|v| v.trim().trim_matches('`').to_owned())
        .filter(|v| source.contains(&format!("{v:?}")))
        .collect()
}

/// What is wrong with `refs` (plus `labels`, named by formats or templates) against what
/// the daemon exports.
fn check_references(
    place: &str,
    refs: &References,
    labels: &BTreeSet<String>,
    exported: &Exported,
    problems: &mut Vec<String>,
) {
    // `up` is Prometheus's own, with the target's labels: job and instance, and under
    // Kubernetes service discovery the trustdrift pod's namespace, pod and container.
    let up: BTreeMap<String, BTreeSet<String>> = ["namespace", "pod", "container"]
        .iter()
        .map(|l| ((*l).to_owned(), BTreeSet::new()))
        .collect();
    let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
    for s in &refs.selectors {
        let Some(family) = exported
            .get(&s.metric)
            .or((s.metric == "up").then_some(&up))
        else {
            problems.push(format!(
                "{place}: {} is not exported by the daemon",
                s.metric
            ));
            continue;
        };
        known.extend(family.keys().cloned());
        for m in &s.matchers {
            if m.label == "__name__" || TARGET_LABELS.contains(&m.label.as_str()) {
                continue;
            }
            let Some(values) = family.get(&m.label) else {
                problems.push(format!("{place}: {} has no label {}", s.metric, m.label));
                continue;
            };
            let literal = (m.op == "=" || m.op == "!=") && !m.value.contains('$');
            if literal
                && !values.contains(&m.value)
                && !documented_values(&m.label).contains(&m.value)
            {
                problems.push(format!(
                    "{place}: {}{{{}{}{:?}}} matches a value neither exported nor documented \
                     (seen: {values:?})",
                    s.metric, m.label, m.op, m.value
                ));
            }
        }
    }
    for label in refs.grouping.iter().chain(labels) {
        if !known.contains(label) {
            problems.push(format!(
                "{place}: label {label} is on none of the metrics it queries"
            ));
        }
    }
}

#[test]
fn every_metric_and_label_the_rules_and_the_dashboard_query_is_exported_by_the_daemon() {
    // Families without series are absent from /metrics, so the daemon is made to export
    // every one for real: a stale reader whose bundle lost a CA (stale, stale since,
    // removed CA still trusted), a server whose certificate expired after its renewal
    // (expired in memory, kind identity), kernel accounting and a node name.
    let dir = TempDir::new("coverage");
    let path = dir.join("ca.pem");
    let (kept, dropped) = (Cert::ca("Coverage Root"), Cert::ca("Coverage Dropped Root"));
    fs::write(&path, bundle(&[&kept, &dropped])).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let leaf = kept.leaf("coverage.internal", Duration::from_secs(4));
    fs::write(&cert, &leaf.pem).unwrap();
    fs::write(&key, &leaf.key_pem).unwrap();
    // A certificate renewed on disk a day before it expires: the expiry-ahead gauge.
    let (soon_cert, soon_key) = (dir.join("soon.crt"), dir.join("soon.key"));
    let soon = kept.leaf("soon.internal", Duration::from_secs(86400));
    fs::write(&soon_cert, &soon.pem).unwrap();
    fs::write(&soon_key, &soon.key_pem).unwrap();
    let Some(daemon) = Daemon::start(&[
        "--set",
        "metrics.bpf_stats=true",
        "--set",
        "metrics.node=coverage-node",
    ]) else {
        return;
    };
    let reader = Agent::on_host(&path);
    let server = python_tls_server(&cert, &key);
    let soon_server = python_tls_server(&soon_cert, &soon_key);
    daemon.wait_for("fresh", reader.pid(), |p| p["verdict"] == "fresh");
    daemon.wait_for("fresh", server.pid(), |p| p["verdict"] == "fresh");
    daemon.wait_for("fresh", soon_server.pid(), |p| p["verdict"] == "fresh");
    fs::write(&path, bundle(&[&kept, &Cert::ca("Coverage Added Root")])).unwrap();
    fs::write(
        &cert,
        kept.leaf("coverage.internal", Duration::from_secs(86400))
            .pem,
    )
    .unwrap();
    fs::write(
        &soon_cert,
        kept.leaf("soon.internal", Duration::from_secs(2 * 86400))
            .pem,
    )
    .unwrap();
    daemon.wait_for("stale", reader.pid(), |p| p["verdict"] == "stale");
    daemon.wait_for("stale", soon_server.pid(), |p| p["verdict"] == "stale");
    daemon.wait_for("expired in memory", server.pid(), |p| {
        p["verdict"] == "expired_in_memory"
    });
    // The daemon publishes its own health every 5 s.
    let exported = eventually(
        "every family in one scrape",
        Duration::from_secs(30),
        || {
            let e = parse_exposition(&daemon.metrics());
            let complete = GROUP_GAUGES.iter().all(|f| e.contains_key(*f))
                && [
                    "trustdrift_events_total",
                    "trustdrift_bpf_program_runs_total",
                    "trustdrift_bpf_map_entries",
                ]
                .iter()
                .all(|f| e.contains_key(*f))
                && e["trustdrift_expired_in_memory_processes"]["kind"].contains("identity");
            complete.then_some(e)
        },
        || daemon.metrics(),
    );
    assert!(
        exported.values().all(|labels| labels
            .get("node")
            .is_some_and(|v| v.contains("coverage-node"))),
        "every series carries the node"
    );
    let mut problems = Vec::new();
    let d = dashboard();
    for (place, expr, labels) in dashboard_queries(&d) {
        let refs = promql::references(&promql::substitute_grafana_intervals(&expr));
        check_references(&place, &refs, &labels, &exported, &mut problems);
    }
    for (place, exprs, columns) in table_columns(&d) {
        let mut refs = References::default();
        for expr in exprs {
            let r = promql::references(&promql::substitute_grafana_intervals(&expr));
            refs.selectors.extend(r.selectors);
            refs.grouping.extend(r.grouping);
        }
        check_references(&place, &refs, &columns, &exported, &mut problems);
    }
    for v in query_variables(&d) {
        let (refs, label) = promql::label_values(v["query"].as_str().unwrap_or_default());
        let place = format!("variable {}", v["name"]);
        check_references(
            &place,
            &refs,
            &BTreeSet::from([label]),
            &exported,
            &mut problems,
        );
    }
    for rule in rules() {
        let place = format!("alert {}", rule["alert"]);
        let refs = promql::references(rule["expr"].as_str().expect("expr"));
        let mut labels = BTreeSet::new();
        for map in [&rule["annotations"], &rule["labels"]] {
            for text in map.as_object().into_iter().flat_map(|m| m.values()) {
                labels.extend(promql::template_labels(text.as_str().unwrap_or("")));
            }
        }
        check_references(&place, &refs, &labels, &exported, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "queried but not exported by trustdrift: {problems:#?}"
    );
}

#[test]
fn the_coverage_check_catches_a_metric_a_label_or_a_value_the_daemon_lacks() {
    let exported = parse_exposition(
        "# TYPE trustdrift_stale_processes gauge\n\
         trustdrift_stale_processes{node=\"n\",kind=\"ca\",confidence=\"observed\",pod=\"\"} 1\n",
    );
    let problems = |expr: &str, labels: &[&str]| {
        let mut p = Vec::new();
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        check_references("q", &promql::references(expr), &labels, &exported, &mut p);
        p
    };
    assert!(
        problems(
            "sum by (node, pod, job) (trustdrift_stale_processes{kind=\"ca\"})",
            &["pod"]
        )
        .is_empty()
    );
    // Documented for the daemon (docs/metrics.md, metrics.rs), though not exported here.
    assert!(problems("trustdrift_stale_processes{confidence=\"unverified\"}", &[]).is_empty());
    for (expr, labels) in [
        ("trustdrift_stale_process", &[][..]),
        ("trustdrift_stale_processes{podname=\"x\"}", &[]),
        ("sum by (podname) (trustdrift_stale_processes)", &[]),
        ("trustdrift_stale_processes", &["podname"]),
        ("trustdrift_stale_processes{confidence=\"observd\"}", &[]),
    ] {
        assert_eq!(problems(expr, labels).len(), 1, "{expr} {labels:?}");
    }
}

// --- End to end: a real drift pages and resolves ---------------------------------------

/// The rules with every `for:` cut to 2 s, so the test takes seconds: the durations
/// themselves are proven by the promtool unit tests, this proves the path from the
/// kernel to the pager.
fn rules_with_short_for() -> String {
    let mut rules = yaml(RULES);
    for group in rules["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            if rule.get("for").is_some() {
                rule["for"] = "2s".into();
            }
        }
    }
    serde_norway::to_string(&rules).expect("YAML")
}

/// Alerts Alertmanager holds as active (resolved ones leave /api/v2/alerts).
fn active_alerts(am: &stack::Server) -> Vec<Value> {
    let (status, body) = am.get("/api/v2/alerts?active=true&silenced=false&inhibited=false");
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

fn alert<'a>(alerts: &'a [Value], name: &str, comm: &str) -> Option<&'a Value> {
    alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == name && a["labels"]["comm"] == comm)
}

/// Whether the pager got a notification of `status` for alert `name` of `comm`.
fn notified(webhook: &Webhook, status: &str, name: &str, comm: &str) -> bool {
    webhook.notifications().iter().any(|n| {
        n["alerts"].as_array().is_some_and(|alerts| {
            alerts.iter().any(|a| {
                a["status"] == status
                    && a["labels"]["alertname"] == name
                    && a["labels"]["comm"] == comm
            })
        })
    })
}

#[test]
fn a_stale_pod_pages_through_alertmanager_and_resolves_after_its_reload() {
    if !(require("prometheus") && require("prometheus-alertmanager")) {
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("alerting-e2e");
    let (kept, distrusted, added) = (
        Cert::ca("Alerting Kept Root"),
        Cert::ca("Alerting Distrusted Root"),
        Cert::ca("Alerting Added Root"),
    );
    let pod_bundle = dir.join("pod-bundle.pem");
    let host_bundle = dir.join("host-bundle.pem");
    fs::write(&pod_bundle, bundle(&[&kept, &distrusted])).unwrap();
    fs::write(&host_bundle, bundle(&[&kept])).unwrap();
    // As the DaemonSet runs it: the node's name from the environment.
    let setup = DaemonSetup {
        env: vec![("TRUSTDRIFT_METRICS_NODE", "e2e-node".into())],
        ..DaemonSetup::default()
    };
    let Some(daemon) = Daemon::start_with(&[], setup) else {
        return;
    };
    let pod = PodAgent::spawn("payments", "agent", &pod_bundle);
    let host = Agent::on_host(&host_bundle);
    let (pod_comm, host_comm) = (pod.agent().comm.clone(), host.comm.clone());
    let seen = daemon.wait_for("fresh", pod.agent().pid(), |p| p["verdict"] == "fresh");
    assert_eq!(
        (&seen["namespace"], &seen["pod"], &seen["container"]),
        (
            &Value::from(pod.namespace.as_str()),
            &Value::from(pod.pod.as_str()),
            &Value::from(pod.container.as_str())
        ),
        "trustdrift attributes the agent to its pod: {seen}"
    );
    daemon.wait_for("fresh", host.pid(), |p| p["verdict"] == "fresh");

    let webhook = Webhook::start();
    let am = stack::alertmanager(&webhook);
    let prom = stack::prometheus(&rules_with_short_for(), daemon.port, &am);
    let describe = || {
        format!(
            "Alertmanager: {:#?}\nPrometheus alerts: {}\nPrometheus rules: {}\nPrometheus \
             targets: {}\nPrometheus log:\n{}\nAlertmanager log:\n{}\nnotifications: {:#?}",
            active_alerts(&am),
            prom.get("/api/v1/alerts").1,
            prom.get("/api/v1/rules").1,
            prom.get("/api/v1/targets").1,
            prom.log(),
            am.log(),
            webhook.notifications()
        )
    };
    // The real Prometheus loads every rule and evaluates it without error, and scrapes
    // the daemon.
    let rule_count = rules().len();
    eventually(
        "every rule loaded and evaluated",
        Duration::from_secs(20),
        || {
            let (_, body) = prom.get("/api/v1/rules");
            let loaded: Vec<Value> = body["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            if let Some(bad) = loaded.iter().find(|r| r["health"] == "err") {
                panic!("Prometheus fails to evaluate a rule: {bad}");
            }
            (loaded.len() == rule_count && loaded.iter().all(|r| r["health"] == "ok")).then_some(())
        },
        describe,
    );
    let up = format!(
        "/api/v1/query?query={}",
        stack::encode("up{job=\"trustdrift\"} == 1")
    );
    eventually(
        "the daemon scraped",
        Duration::from_secs(20),
        || {
            prom.get(&up).1["data"]["result"]
                .as_array()
                .is_some_and(|r| r.len() == 1)
                .then_some(())
        },
        describe,
    );

    // Healthy: every stat panel reads a number, and 0 where nothing is wrong, never "No
    // data". Other tests' processes on this machine may drift meanwhile, so the groups
    // are narrowed to a pod that exists nowhere, as a user narrowing the dashboard would.
    let d = dashboard();
    for p in panels(&d).iter().filter(|p| p["type"] == "stat") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            for (pod, zero) in [(".*", false), ("no-such-pod", true)] {
                let query = dashboard_variables(promql::substitute_grafana_intervals(expr), pod);
                let path = format!("/api/v1/query?query={}", stack::encode(&query));
                let (status, body) = prom.get(&path);
                assert_eq!(status, 200, "{query}: {body}");
                let result = body["data"]["result"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(
                    result.len(),
                    1,
                    "stat {}: {query} gives no single number (\"No data\"): {body}",
                    p["title"]
                );
                if zero {
                    assert_eq!(
                        result[0]["value"][1], "0",
                        "stat {} on a healthy node: {query}: {body}",
                        p["title"]
                    );
                }
            }
        }
    }

    // The drift: the pod's bundle loses a CA (distrusted), the host's gains one, the way
    // update-ca-certificates writes a bundle.
    replace_atomically(&pod_bundle, &bundle(&[&kept]));
    replace_atomically(&host_bundle, &bundle(&[&kept, &added]));
    let drifted = Instant::now();
    daemon.wait_for("stale", pod.agent().pid(), |p| p["verdict"] == "stale");
    daemon.wait_for("stale", host.pid(), |p| p["verdict"] == "stale");
    let firing = eventually(
        "the alerts of both agents at Alertmanager",
        Duration::from_secs(30),
        || {
            let alerts = active_alerts(&am);
            let all = alert(&alerts, "TrustDriftStaleProcess", &pod_comm).is_some()
                && alert(&alerts, "TrustDriftRemovedCATrusted", &pod_comm).is_some()
                && alert(&alerts, "TrustDriftStaleProcess", &host_comm).is_some();
            all.then_some(alerts)
        },
        describe,
    );
    eprintln!(
        "alerts at Alertmanager {:?} after the drift",
        drifted.elapsed()
    );

    // What the on-call engineer gets for the pod: where it is, what it runs, what to do.
    let stale = alert(&firing, "TrustDriftStaleProcess", &pod_comm).unwrap();
    for (label, value) in [
        ("severity", "warning"),
        ("kind", "ca"),
        ("confidence", "observed"),
        ("namespace", pod.namespace.as_str()),
        ("pod", pod.pod.as_str()),
        ("container", pod.container.as_str()),
        ("node", "e2e-node"),
        ("job", "trustdrift"),
    ] {
        assert_eq!(stale["labels"][label], value, "{label} of {stale:#}");
    }
    let where_ = format!(
        "in container {} of pod {}/{} on node e2e-node",
        pod.container, pod.namespace, pod.pod
    );
    assert!(
        stale["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("1 {pod_comm} process(es) {where_}"))),
        "{stale:#}"
    );
    let remedy = stale["annotations"]["remedy"].as_str().unwrap_or_default();
    assert!(
        remedy.starts_with(&format!("Make {pod_comm} read its trust files again"))
            && remedy.contains(&format!(
                "kubectl -n {} rollout restart the workload that owns pod {}",
                pod.namespace, pod.pod
            )),
        "{stale:#}"
    );
    let runbook = stale["annotations"]["runbook_url"]
        .as_str()
        .unwrap_or_default();
    assert!(repo().join(runbook_path(runbook)).is_file(), "{runbook}");
    let removed = alert(&firing, "TrustDriftRemovedCATrusted", &pod_comm).unwrap();
    assert_eq!(removed["labels"]["category"], "security", "{removed:#}");
    assert_eq!(removed["labels"]["pod"], pod.pod.as_str(), "{removed:#}");
    // The host process is named as such, not after the trustdrift pod that reported it.
    let on_host = alert(&firing, "TrustDriftStaleProcess", &host_comm).unwrap();
    for label in ["namespace", "pod", "container"] {
        assert!(
            on_host["labels"].get(label).is_none(),
            "{label} of {on_host:#}"
        );
    }
    assert!(
        on_host["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("outside containers on node e2e-node")),
        "{on_host:#}"
    );
    // And nothing that should not fire: the host gained a CA (nothing removed), the
    // daemon is up with its probe attached.
    assert!(alert(&firing, "TrustDriftRemovedCATrusted", &host_comm).is_none());
    let instance = format!("127.0.0.1:{}", daemon.port);
    assert!(
        !firing
            .iter()
            .any(|a| a["labels"]["alertname"] == "TrustDriftProbeDown"
                && a["labels"]["instance"] == instance.as_str()),
        "{firing:#?}"
    );
    eventually(
        "the pager notified",
        Duration::from_secs(15),
        || {
            (notified(&webhook, "firing", "TrustDriftStaleProcess", &pod_comm)
                && notified(&webhook, "firing", "TrustDriftRemovedCATrusted", &pod_comm))
            .then_some(())
        },
        describe,
    );

    // The remedy: the pod's agent reloads. Its alerts resolve; the host's, not remedied,
    // keeps firing.
    pod.agent().reload();
    daemon.wait_for("fresh after SIGHUP", pod.agent().pid(), |p| {
        p["verdict"] == "fresh"
    });
    let reloaded = Instant::now();
    eventually(
        "the pod's alerts resolved at Alertmanager",
        Duration::from_secs(30),
        || {
            let alerts = active_alerts(&am);
            alerts
                .iter()
                .all(|a| a["labels"]["comm"] != pod_comm.as_str())
                .then_some(())
        },
        describe,
    );
    eventually(
        "the pager told of the resolution",
        Duration::from_secs(15),
        || {
            (notified(&webhook, "resolved", "TrustDriftStaleProcess", &pod_comm)
                && notified(
                    &webhook,
                    "resolved",
                    "TrustDriftRemovedCATrusted",
                    &pod_comm,
                ))
            .then_some(())
        },
        describe,
    );
    eprintln!("resolved {:?} after the reload", reloaded.elapsed());
    assert!(
        alert(&active_alerts(&am), "TrustDriftStaleProcess", &host_comm).is_some(),
        "{}",
        describe()
    );
    host.reload();
    eventually(
        "the host agent's alert resolved",
        Duration::from_secs(30),
        || {
            alert(&active_alerts(&am), "TrustDriftStaleProcess", &host_comm)
                .is_none()
                .then_some(())
        },
        describe,
    );
    eprintln!("end to end in {:?}", started.elapsed());
}
