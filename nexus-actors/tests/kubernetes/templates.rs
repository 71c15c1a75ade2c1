//! The templates: bad input refused or escaped, never rendered into a
//! wrong manifest; an operator's template that asks for more than it may
//! refused at start; and the objects sent validated against the
//! Kubernetes schemas (`kubernetes-validate`) and our Knative schema.

use std::path::{Path, PathBuf};

use nexus_actors::roles::panel_manager::driver::RuntimeDriver;
use nexus_actors::roles::panel_manager::kubernetes::{object_name, KubeConfig, KubeDriver, Templates};
use nexus_actors::telemetry::Metrics;
use serde_json::Value;

use super::common::{app, client, driver, settings, studio, until};
use super::driver::running;
use nexus_testkit::kube_api::MockKube;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn template(name: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/k8s/templates").join(name)).expect("a template")
}

/// Changes `dev_pod.yaml` and `prod_service.yaml`.
type Edit = dyn Fn(&mut String, &mut String);

/// A driver over templates edited by `edit(dev_pod, prod_service)`.
fn with_templates(mock: &MockKube, edit: impl Fn(&mut String, &mut String)) -> Result<KubeDriver, String> {
    let dir = nexus_testkit::tempdir("kube-templates");
    let (mut dev, mut prod) = (template("dev_pod.yaml"), template("prod_service.yaml"));
    edit(&mut dev, &mut prod);
    std::fs::write(dir.join("dev_pod.yaml"), dev).expect("write");
    std::fs::write(dir.join("prod_service.yaml"), prod).expect("write");
    let templates = Templates::load(&dir).map_err(|e| e.to_string())?;
    KubeDriver::with_client(settings(), templates, client(mock), Metrics::new()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn ids_that_could_break_yaml_are_refused_before_any_request() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    let long = "a".repeat(101);
    for (panel, instance) in
        [("x\"\nkind: Secret", "x-1"), ("demo", "demo-1\n  hostNetwork: true"), ("demo", long.as_str()), ("", "x")]
    {
        let error = driver.start(studio(panel, instance, "alice")).await.err().expect("refused");
        assert!(error.to_string().contains("invalid"), "{error}");
    }
    assert!(driver.volume("../etc", "template:empty").await.is_err());
    assert!(driver.volume("demo", "template:../../etc/passwd").await.is_err(), "only known templates");
    assert!(mock.requests().is_empty(), "nothing was sent: {:?}", mock.requests());
}

#[tokio::test]
async fn values_are_escaped_so_they_cannot_add_fields() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    let owner = "mallory\"\n    injected: \"true\"\n  hostNetwork: true\n# {{ 7*7 }}";
    let instance = "a".repeat(100);
    let name = object_name(&instance);
    assert!(name.len() <= 49, "{name}");
    let run = async {
        until("the pod", || mock.object("pods", &name).is_some()).await;
        assert!(mock.set_status("pods", &name, running("10.8.0.3", 0, None)));
    };
    driver.volume("Panel_X", "template:empty").await.expect("the volume");
    let (started, ()) = tokio::join!(driver.start(studio("Panel_X", &instance, owner)), run);
    started.expect("started");
    let pod = mock.object("pods", &name).expect("the pod");
    assert_eq!(pod["metadata"]["annotations"]["nexus.dev/owner"], owner, "the owner, exactly, as one value");
    assert_eq!(pod["metadata"]["annotations"]["nexus.dev/instance"], instance.as_str());
    assert!(pod["spec"].get("hostNetwork").is_none() && pod["metadata"].get("injected").is_none(), "{pod}");
}

#[tokio::test]
async fn an_operator_template_that_renders_the_wrong_manifest_fails_the_start() {
    let mock = MockKube::start();
    with_templates(&mock, |_, _| {}).expect("the shipped templates load from a directory");
    let cases: [(&str, &Edit); 15] = [
        ("automountServiceAccountToken", &|dev, _| {
            *dev = dev.replace(
                "automountServiceAccountToken: false\n  enableServiceLinks",
                "automountServiceAccountToken: true\n  enableServiceLinks",
            )
        }),
        ("may not mount", &|dev, _| {
            *dev = dev.replace(
                "        - {name: tmp, mountPath: /tmp}",
                "        - {name: kube-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount}",
            )
        }),
        ("unexpected", &|dev, _| {
            *dev = dev.replace("{%- endif %}", "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: extra\n  namespace: {{ namespace }}\n{%- endif %}")
        }),
        ("unexpected Pod named \"check\"", &|dev, _| {
            *dev = dev.replace("kind: Pod\nmetadata:\n  name: {{ name }}", "kind: Pod\nmetadata:\n  name: {{ panel }}")
        }),
        ("not in namespace", &|_, prod| {
            *prod = prod.replace(
                "  name: {{ snapshot }}\n  namespace: {{ namespace }}",
                "  name: {{ snapshot }}\n  namespace: \"kube-system\"",
            )
        }),
        ("prod_service.yaml", &|_, prod| prod.push_str("{% if %}")),
        ("may not set shareProcessNamespace", &|dev, _| {
            *dev = dev.replace(
                "  enableServiceLinks: false\n  restartPolicy",
                "  enableServiceLinks: false\n  shareProcessNamespace: true\n  restartPolicy",
            )
        }),
        ("container panel may not read key \"url\"", &|dev, _| {
            *dev = dev.replace("        - {name: HOME, value: /home}", "        - name: STOLEN\n          valueFrom: {secretKeyRef: {name: {{ redis_secret }}, key: url}}\n        - {name: HOME, value: /home}")
        }),
        ("may only get and delete the pod", &|dev, _| {
            *dev = dev.replace("    verbs: [\"delete\"]", "    verbs: [\"delete\", \"patch\"]")
        }),
        ("must bind Role", &|dev, _| {
            *dev = dev.replace("  kind: Role\n  name: {{ service_account }}", "  kind: ClusterRole\n  name: \"admin\"")
        }),
        ("exactly the tokens", &|dev, _| {
            *dev = dev.replace("  watchdog-token: {{ watchdog_token }}", "  watchdog-token: \"chosen-by-the-template\"")
        }),
        ("runtimeClassName must be gvisor", &|dev, _| {
            *dev = dev.replace("  runtimeClassName: {{ runtime_class }}\n", "")
        }),
        ("volume host: only emptyDir", &|dev, _| {
            *dev = dev.replace(
                "    - name: tmp\n      emptyDir:",
                "    - name: host\n      hostPath: {path: /}\n    - name: tmp\n      emptyDir:",
            )
        }),
        ("may not add capabilities", &|dev, _| {
            *dev = dev.replace("          drop: [\"ALL\"]", "          drop: [\"ALL\"]\n          add: [\"NET_ADMIN\"]")
        }),
        ("must be of type Opaque", &|dev, _| {
            *dev = dev.replace("type: Opaque", "type: kubernetes.io/service-account-token")
        }),
    ];
    for (expected, edit) in cases {
        let error = with_templates(&mock, edit).err().unwrap_or_else(|| panic!("{expected:?}: not refused at start"));
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }
    assert!(mock.requests().is_empty(), "a refused template sends nothing");
}

#[tokio::test]
async fn settings_that_could_break_a_manifest_are_refused() {
    let mock = MockKube::start();
    let bad = [
        KubeConfig { nexus_image: "nexus:1\n    privileged: true".to_owned(), ..settings() },
        KubeConfig { panel_image: "\"python\"".to_owned(), ..settings() },
        KubeConfig { namespace: "Kube_System".to_owned(), ..settings() },
        KubeConfig { storage_class: Some("a b".to_owned()), ..settings() },
    ];
    for config in bad {
        let error = KubeDriver::with_client(config, Templates::embedded(), client(&mock), Metrics::new()).err();
        assert!(error.is_some_and(|e| e.to_string().starts_with("invalid")));
    }
}

/// Every object the driver sends, as the mock received it.
async fn sent_objects(mock: &MockKube) -> Vec<Value> {
    let driver = driver(mock);
    driver.volume("demo", "template:python_minimal").await.expect("volume");
    let name = object_name("demo-v1");
    let run = async {
        until("the pod", || mock.object("pods", &name).is_some()).await;
        assert!(mock.set_status("pods", &name, running("10.8.0.3", 0, None)));
    };
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-v1", "alice")), run);
    started.expect("studio");
    let snapshot = driver.snapshot("demo", "template:python_minimal").await.expect("snapshot");
    let name = object_name("demo-v2");
    let ready = async {
        until("the service", || mock.object("services", &name).is_some()).await;
        let status =
            serde_json::json!({"conditions": [{"type": "Ready", "status": "True"}], "url": "http://x.example"});
        assert!(mock.set_status("services", &name, status));
    };
    let (started, ()) = tokio::join!(driver.start(app(snapshot, "demo-v2")), ready);
    started.expect("app");
    // A snapshot makes sure of the volume first: its second POST is a 409.
    let mut sent: Vec<Value> = Vec::new();
    for body in mock.requests().into_iter().filter(|r| r.method == "POST").map(|r| r.body) {
        if !sent.iter().any(|s| s["kind"] == body["kind"] && s["metadata"]["name"] == body["metadata"]["name"]) {
            sent.push(body);
        }
    }
    sent
}

#[tokio::test]
async fn the_objects_sent_pass_the_kubernetes_schemas() {
    let validate = deploy_venv().join("bin/kubernetes-validate");
    if !nexus_testkit::prerequisite(validate.is_file(), "kubernetes-validate (scripts/lib.sh ensure_deploy_checks)") {
        return;
    }
    let mock = MockKube::start();
    let objects = sent_objects(&mock).await;
    let dir = nexus_testkit::tempdir("kube-sent");
    let mut files = Vec::new();
    let mut knative = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        if object["apiVersion"] == "serving.knative.dev/v1" {
            knative.push(object.clone());
            continue;
        }
        let file = dir.join(format!("{i:02}-{}.json", object["kind"].as_str().unwrap_or("x")));
        std::fs::write(&file, object.to_string()).expect("write");
        files.push(file);
    }
    assert_eq!(files.len(), 8, "claim, secret, account, role, binding, pod, snapshot claim, app secret");
    let out = std::process::Command::new(&validate)
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate refused what the driver sends:\n{said}");

    assert_eq!(knative.len(), 1);
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/k8s/schemas/knative-service-v1.json")).expect("the schema"),
    )
    .expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("a schema");
    let errors: Vec<String> =
        validator.iter_errors(&knative[0]).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "the Knative Service does not pass our schema: {errors:?}");
    let mut broken = knative[0].clone();
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = serde_json::json!([{"containerPort": "8080"}]);
    assert!(!validator.is_valid(&broken), "the schema can fail");
}

/// Where `scripts/lib.sh` installs the deploy checks.
pub(crate) fn deploy_venv() -> PathBuf {
    std::env::var_os("NEXUS_DEPLOY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nexus/deploy-venv"))
}
