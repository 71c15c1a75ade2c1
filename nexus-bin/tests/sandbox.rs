//! The `local` driver's sandbox with real parts only: a real redis-server,
//! the real `nexus sidecar` and `nexus watchdog`, real network namespaces,
//! and runsc when it is installed. A probe panel (written into the Studio
//! volume by the test) tries TCP connections from INSIDE the sandbox and
//! reports what happened; the test decides what must fail.
//!
//! Needs root (CI runs as root); without it every test prints SKIPPED, and
//! fails when `CI` is set: a skip there would mean isolation went unchecked.
//! Likewise without runsc the gVisor assertions fail under `CI`. Also here:
//! the data directory's modes keep a panel's uid to its own files, and the
//! instance's sidecar secret reaches the panel, its sidecar and nothing else.

#[path = "sandbox/egress.rs"]
mod egress;
#[path = "sandbox/files.rs"]
mod files;
#[path = "sandbox/harness.rs"]
mod harness;
#[path = "sandbox/limits.rs"]
mod limits;
#[path = "sandbox/probe.rs"]
mod probe;
#[path = "sandbox/secret.rs"]
mod secret;
#[path = "sandbox/start_order.rs"]
mod start_order;
#[path = "sandbox/warm.rs"]
mod warm;

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{
    env, get_json, host_ip, panel_id, probe, processes_mentioning, register, skipped, spec, volume_with_probe, Cleanup,
    Env,
};
use nexus_actors::infra::find_program;
use nexus_actors::instance::Isolation;
use nexus_actors::roles::panel_manager::driver::{
    Code, DriverError, InstanceEvent, PanelFileError, RuntimeDriver, Started,
};
use nexus_actors::roles::panel_manager::local::{netns_name, LocalConfig, LocalDriver, SandboxChoice};
use nexus_testkit::prerequisite;
use serde_json::Value;

#[test]
fn a_studio_instance_reaches_its_sidecar_and_nothing_else() {
    if skipped("a_studio_instance_reaches_its_sidecar_and_nothing_else") {
        return;
    }
    let env = env("isolated", SandboxChoice::Auto);
    let (probe_panel, other_panel) = (panel_id(), panel_id());
    let id = std::process::id();
    let (a, b) = (format!("probe-{id}"), format!("other-{id}"));
    let mut cleanup = Cleanup { instances: vec![a.clone(), b.clone()] };
    // The "system plane": a listener on every host address.
    let system_plane = TcpListener::bind("0.0.0.0:0").unwrap();
    let system_port = system_plane.local_addr().unwrap().port();
    let host_ip = host_ip();
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &probe_panel).await;
        let started: Started = driver.start(spec(&a, &probe_panel, code)).await.expect("start the probe panel");
        let other_code = volume_with_probe(&driver, &env.redis_url, &other_panel).await;
        let other = driver.start(spec(&b, &other_panel, other_code)).await.expect("start another");
        let addr = started.endpoint.addr.clone();
        assert!(started.endpoint.watchdog.is_some(), "a Studio instance has a watchdog endpoint");

        // What the probe must not reach, each first shown reachable from the host.
        let (other_host, other_port) = other.endpoint.addr.rsplit_once(':').unwrap();
        let other_port: u16 = other_port.parse().unwrap();
        get_json(&other.endpoint.addr, "/whoami");
        let mut forbidden = vec![
            ("127.0.0.1".to_owned(), env.redis_port, "the test's redis"),
            ("127.0.0.1".to_owned(), system_port, "the system plane on loopback"),
            (other_host.to_owned(), other_port, "another panel's address"),
        ];
        if TcpStream::connect(("127.0.0.1", 6379)).is_ok() {
            forbidden.push(("127.0.0.1".to_owned(), 6379, "the shared redis"));
        }
        if let Some(ip) = &host_ip {
            assert!(TcpStream::connect((ip.as_str(), system_port)).is_ok(), "the host reaches {ip}:{system_port}");
            forbidden.push((ip.clone(), system_port, "the system plane on the host's address"));
        } else {
            eprintln!("no non-loopback host address: that probe is left out");
        }
        for (host, port, what) in &forbidden {
            assert!(TcpStream::connect((host.as_str(), *port)).is_ok(), "{what} is reachable from the host");
        }
        forbidden.push(("169.254.169.254".to_owned(), 80, "the metadata address"));
        forbidden.push(("10.0.0.1".to_owned(), 80, "a private range"));
        forbidden.push(("192.168.0.1".to_owned(), 80, "a private range"));
        for (host, port, what) in &forbidden {
            let answer = probe(&addr, host, *port);
            assert_eq!(answer["connected"], false, "the panel reached {what} ({host}:{port}): {answer}");
        }

        // Its own sidecar works, from inside, where the panel expects it.
        let sidecar = get_json(&addr, "/sidecar");
        assert_eq!(sidecar["status"], 200, "the panel's own sidecar answers /healthz: {sidecar}");
        assert_eq!(probe(&addr, "127.0.0.1", 3500)["connected"], true);
        let watchdog = get_json(started.endpoint.watchdog.as_deref().unwrap(), "/healthz");
        assert_eq!(watchdog["instance"], a.as_str(), "the watchdog answers at the instance's address: {watchdog}");
        let whoami = get_json(&addr, "/whoami");
        assert_ne!(whoami["uid"], 0, "panel code never runs as root: {whoami}");

        let kernel = get_json(&addr, "/kernel");
        if prerequisite(find_program("runsc").is_some(), "runsc, for the gVisor assertions (apt-get install runsc)") {
            assert_eq!(started.isolation, Isolation::Gvisor, "runsc is installed: Auto must pick gVisor");
            assert!(started.warning.is_none(), "{:?}", started.warning);
            let dmesg = kernel["dmesg"].as_str().unwrap_or_default();
            assert!(dmesg.contains("Starting gVisor"), "the panel runs under gVisor: {kernel}");
        } else {
            assert_eq!(started.isolation, Isolation::Namespaces, "without gVisor, Auto takes bubblewrap");
            assert!(started.warning.is_some(), "a fallback to namespaces is announced");
        }

        for instance in [&a, &b] {
            driver.stop(instance, Duration::from_secs(5)).await.expect("stop");
            assert!(!Path::new("/run/netns").join(netns_name(instance)).exists(), "the namespace is deleted");
            assert_eq!(processes_mentioning(instance), Vec::<String>::new(), "nothing of {instance} runs");
        }
        let logs = driver.logs(&a, 50).await.expect("logs outlive the instance");
        assert!(logs.iter().any(|l| l.contains("probe panel up")), "{logs:?}");
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn a_plain_process_sandbox_isolates_too_and_stop_kills_what_escaped_its_group() {
    if skipped("a_plain_process_sandbox_isolates_too_and_stop_kills_what_escaped_its_group") {
        return;
    }
    let env = env("process", SandboxChoice::Process);
    let panel = panel_id();
    let instance = format!("process-{}", std::process::id());
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        let started = driver.start(spec(&instance, &panel, code)).await.expect("start");
        assert_eq!(started.isolation, Isolation::Process);
        assert!(started.warning.as_deref().is_some_and(|w| w.contains("UNISOLATED")), "{:?}", started.warning);
        let addr = started.endpoint.addr.clone();
        assert_eq!(probe(&addr, "127.0.0.1", env.redis_port)["connected"], false, "redis from a process sandbox");
        assert_eq!(get_json(&addr, "/sidecar")["status"], 200);
        let whoami = get_json(&addr, "/whoami");
        assert_ne!(whoami["uid"], 0);
        // Set after setuid (which clears it): the panel dies with nexus.
        assert_eq!(get_json(&addr, "/pdeathsig")["signal"], 9, "PR_SET_PDEATHSIG survives the uid change");

        // Secrets: the watchdog's token and the Redis URL are on no command
        // line (any local uid reads those) and not in the panel's environment.
        let token = started.endpoint.watchdog_token.clone().expect("a Studio instance has a watchdog token");
        assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
        for secret in [token.as_str(), env.redis_url.as_str()] {
            assert_eq!(processes_mentioning(secret), Vec::<String>::new(), "a command line holds a secret");
            assert!(!whoami["env"].to_string().contains(secret), "the panel's environment holds a secret: {whoami}");
        }
        // The sidecar secret is the panel's to check: in its environment and
        // its sidecar's, on no command line, not in the endpoint (the route).
        let sidecar_token = started.sidecar_token.clone().expect("the driver hands back the sidecar secret");
        assert!(sidecar_token.len() >= 32 && sidecar_token != token, "{sidecar_token}");
        assert_eq!(whoami["env"]["NEXUS_SIDECAR_TOKEN"], sidecar_token.as_str(), "the panel has it: {whoami}");
        assert_eq!(processes_mentioning(&sidecar_token), Vec::<String>::new(), "a command line holds it");
        assert!(!serde_json::to_string(&started.endpoint).unwrap().contains(&sidecar_token), "the route holds it");
        let helper_env = |name: &str| helper_environment(&instance, name);
        let watchdog_env = helper_env("watchdog");
        assert!(watchdog_env.lines().any(|l| l == format!("NEXUS_WATCHDOG_TOKEN={token}")), "the watchdog has it");
        assert!(watchdog_env.lines().any(|l| l == format!("REDIS_URL={}", env.redis_url)));
        let sidecar_env = helper_env("sidecar");
        // The sidecar logs in as its own user, which holds its panel's share
        // of the bus only.
        let login = sidecar_env.lines().find_map(|l| l.strip_prefix("REDIS_URL=")).expect("the sidecar's REDIS_URL");
        let login = login.to_owned();
        assert!(login.contains(&format!("nexus-sidecar-{instance}:")), "{login}");
        sidecar_acl_holds_it_to_its_panel(&login, &panel);
        assert!(sidecar_env.lines().any(|l| l == format!("NEXUS_SIDECAR_TOKEN={sidecar_token}")), "the sidecar has it");
        assert!(!watchdog_env.contains(&sidecar_token), "the watchdog has no use for it");

        // The sidecar is ours: when it dies the driver starts it again.
        let sidecars: Vec<String> =
            processes_mentioning(&instance).into_iter().filter(|p| p.contains(" sidecar ")).collect();
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
        let pid = sidecars[0].split(':').next().unwrap().to_owned();
        assert!(std::process::Command::new("kill").args(["-9", &pid]).status().unwrap().success());
        // Waits without blocking: the driver's supervisors run on this thread.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let restarted = processes_mentioning(&instance)
                .iter()
                .any(|p| p.contains(" sidecar ") && !p.starts_with(&format!("{pid}:")));
            let answer =
                common::get_at(&addr, "/sidecar").and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok());
            if restarted && answer.is_some_and(|a| a["status"] == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the sidecar was not restarted");
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }

        // A child in a new session leaves the process group; stop finds it
        // through the namespace.
        let marker = format!("4242.{}", std::process::id());
        get_json(&addr, &format!("/escape?seconds={marker}"));
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep runs");
        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
        let gone = redis::Client::open(login.as_str()).unwrap().get_connection();
        assert!(gone.is_err(), "the sidecar's user outlived its instance");
        assert_eq!(processes_mentioning(&marker), Vec::<String>::new(), "the escaped process is gone");
        assert_eq!(processes_mentioning(&instance), Vec::<String>::new());
        assert!(!Path::new("/run/netns").join(netns_name(&instance)).exists());
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn a_user_process_that_exits_is_reported_and_its_output_is_in_the_logs() {
    if skipped("a_user_process_that_exits_is_reported_and_its_output_is_in_the_logs") {
        return;
    }
    let env = env("exits", SandboxChoice::Auto);
    let panel = panel_id();
    let instance = format!("exits-{}", std::process::id());
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        register(&env.redis_url, &panel).await;
        let volume = driver.volume(&panel, "template:python_minimal").await.unwrap();
        let command = r#"{"command": ["python3", "-c", "print('hello from the panel'); raise SystemExit(7)"]}"#;
        std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
        let mut started = driver.start(spec(&instance, &panel, Code::Studio(volume))).await.expect("start");
        let event = actix_rt::time::timeout(Duration::from_secs(60), started.events.recv()).await.expect("an event");
        assert_eq!(event, Some(InstanceEvent::Exited { code: Some(7), limit: None, restarted: false }));
        let logs = driver.logs(&instance, 10).await.unwrap();
        assert!(logs.iter().any(|l| l == "hello from the panel"), "{logs:?}");
        // Each step of the start was timed once (the cold-start split).
        let phases = &driver.metrics().start_phases;
        for phase in ["prepare", "copy", "network", "sandbox", "credentials", "spawn"] {
            assert_eq!(phases.with_label_values(&[phase]).get_sample_count(), 1, "{phase}");
        }

        driver.restart(&instance).await.expect("restart");
        let event = actix_rt::time::timeout(Duration::from_secs(60), started.events.recv()).await.expect("an event");
        assert_eq!(
            event,
            Some(InstanceEvent::Exited { code: Some(7), limit: None, restarted: false }),
            "a restarted process is watched too"
        );
        let logs = driver.logs(&instance, 10).await.unwrap();
        assert_eq!(logs.iter().filter(|l| *l == "hello from the panel").count(), 2, "{logs:?}");
        assert_eq!(driver.logs(&instance, 1).await.unwrap().len(), 1, "at most the lines asked for");

        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
        assert!(matches!(driver.stop(&instance, Duration::ZERO).await, Err(DriverError::NoInstance(_))));
        assert!(matches!(driver.restart(&instance).await, Err(DriverError::NoInstance(_))));
        assert_eq!(processes_mentioning(&instance), Vec::<String>::new());
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn unknown_sources_bad_ids_and_panels_without_a_command_are_refused() {
    // Runs without root too: every refusal comes before a namespace.
    let env = env("refused", SandboxChoice::Auto);
    let driver = env.driver.clone();
    let data = env.dir.join("data");
    actix_rt::System::new().block_on(async move {
        for source in ["/etc", "../../etc", "template:../python_minimal", "template:nope", "python_minimal", ""] {
            let volume = driver.volume("p1", source).await;
            assert!(matches!(volume, Err(DriverError::UnknownSource(..))), "{source:?}: {volume:?}");
            let snapshot = driver.snapshot("p1", source).await;
            assert!(matches!(snapshot, Err(DriverError::UnknownSource(..))), "{source:?}: {snapshot:?}");
        }
        assert!(!data.join("volumes/p1").exists(), "a refused source leaves no volume");
        for panel in ["../escape", "a/b", "", ".", "x y"] {
            let volume = driver.volume(panel, "template:python_minimal").await;
            assert!(matches!(volume, Err(DriverError::InvalidId { what: "panel", .. })), "panel {panel:?}: {volume:?}");
        }
        assert!(!data.join("escape").exists());

        let volume = driver.volume("nocommand", "template:python_minimal").await.unwrap();
        std::fs::remove_file(volume.location.path().join("nexus-panel.json")).unwrap();
        std::fs::remove_file(volume.location.path().join("server.py")).unwrap();
        let started = driver.start(spec("nocommand-1", "nocommand", Code::Studio(volume.clone()))).await;
        assert!(matches!(started, Err(DriverError::NoCommand)), "{:?}", started.err());
        std::fs::write(volume.location.path().join("nexus-panel.json"), r#"{"command": []}"#).unwrap();
        let started = driver.start(spec("nocommand-2", "nocommand", Code::Studio(volume.clone()))).await;
        assert!(matches!(started, Err(DriverError::PanelFile(PanelFileError::NoProgram))), "{:?}", started.err());
        std::fs::write(volume.location.path().join("nexus-panel.json"), "not json").unwrap();
        let started = driver.start(spec("nocommand-3", "nocommand", Code::Studio(volume.clone()))).await;
        assert!(matches!(started, Err(DriverError::PanelFile(PanelFileError::Json(_)))), "{:?}", started.err());
        std::fs::remove_file(volume.location.path().join("nexus-panel.json")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", volume.location.path().join("nexus-panel.json")).unwrap();
        let started = driver.start(spec("nocommand-4", "nocommand", Code::Studio(volume))).await;
        let refused = matches!(started, Err(DriverError::PanelFile(PanelFileError::NotARegularFile { .. })));
        assert!(refused, "a symlinked nexus-panel.json is refused, not followed: {:?}", started.err());
        assert!(matches!(driver.logs("nothing-here", 5).await, Err(DriverError::NoInstance(_))));
        let escape = driver.logs("../../etc", 5).await;
        assert!(matches!(escape, Err(DriverError::InvalidId { what: "instance", .. })), "{escape:?}");
    });
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A driver that dies without stopping its instances leaves their
/// namespaces and whatever escaped into them; the next driver on the same
/// data dir deletes them, and leaves other nodes' namespaces alone.
#[test]
fn a_new_driver_sweeps_the_namespaces_a_crashed_one_left() {
    if skipped("a_new_driver_sweeps_the_namespaces_a_crashed_one_left") {
        return;
    }
    let env = env("sweep", SandboxChoice::Process);
    let panel = panel_id();
    let (instance, foreign) = (format!("sweep-{}", std::process::id()), format!("foreign-{}", std::process::id()));
    // Also deletes the foreign namespace at the end.
    let cleanup = Cleanup { instances: vec![instance.clone(), foreign.clone()] };
    let Env { dir, _brokers, redis_url, driver, .. } = env;
    let data_dir = dir.join("data");
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &redis_url, &panel).await;
        let started = driver.start(spec(&instance, &panel, code)).await.expect("start");
        let marker = format!("4343.{}", std::process::id());
        get_json(&started.endpoint.addr, &format!("/escape?seconds={marker}"));
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep runs");
        // Another node's instance: a namespace with no directory of ours.
        let added = std::process::Command::new("ip").args(["netns", "add", &netns_name(&foreign)]).status();
        assert!(added.unwrap().success());

        // The "crash": the driver is gone without a stop; its process
        // groups die with it, the namespace and the escaped sleep do not.
        drop(driver);
        actix_rt::time::sleep(Duration::from_secs(1)).await;
        let stale = Path::new("/run/netns").join(netns_name(&instance));
        assert!(stale.exists(), "the namespace outlived the driver");
        let cgroup = instance_cgroup(&instance);
        assert!(cgroup.is_dir(), "the cgroup {} outlived the driver", cgroup.display());
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep outlived the driver");

        let next = LocalDriver::new(LocalConfig::new(
            data_dir,
            PathBuf::from(env!("CARGO_BIN_EXE_nexus")),
            redis_url.clone(),
            SandboxChoice::Process,
        ));
        assert_eq!(next.sweep_stale().await, 1, "exactly our stale namespace is swept");
        assert!(!stale.exists(), "the stale namespace is deleted");
        assert!(!cgroup.exists(), "the stale cgroup {} is removed", cgroup.display());
        assert_eq!(processes_mentioning(&marker), Vec::<String>::new(), "what ran in it is killed");
        assert!(Path::new("/run/netns").join(netns_name(&foreign)).exists(), "another node's namespace stays");
        assert_eq!(next.metrics().stale_swept.get(), 1);
        assert_eq!(next.sweep_stale().await, 1, "swept once per driver");
    });
    drop(cleanup);
    drop(_brokers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn under_gvisor_a_panel_reaches_the_internet_and_dns_and_nothing_private() {
    egress::egress_policy("egress-gvisor", SandboxChoice::Gvisor);
}

#[test]
fn under_namespaces_a_panel_reaches_the_internet_and_dns_and_nothing_private() {
    egress::egress_policy("egress-namespaces", SandboxChoice::Namespaces);
}

#[test]
fn under_gvisor_memory_and_process_limits_are_enforced_and_reported() {
    limits::limits_are_enforced_and_reported("limits-gvisor", SandboxChoice::Gvisor);
}

#[test]
fn under_namespaces_memory_and_process_limits_are_enforced_and_reported() {
    limits::limits_are_enforced_and_reported("limits-namespaces", SandboxChoice::Namespaces);
}

/// What a sidecar's Redis user may do: its own panel's channels and keys,
/// nothing of another panel's or the platform's.
fn sidecar_acl_holds_it_to_its_panel(login: &str, panel: &str) {
    let mut conn = redis::Client::open(login).unwrap().get_connection().expect("the sidecar's user logs in");
    let other = harness::panel_id();
    let publish = |conn: &mut redis::Connection, channel: &str| {
        redis::cmd("PUBLISH").arg(channel).arg("x").query::<i64>(conn).map(|_| ())
    };
    publish(&mut conn, &format!("nexus:panel:{panel}:out:notes")).expect("its own outbound channel");
    publish(&mut conn, "nexus:tools:replies:node:registry").expect("tool-call replies");
    for channel in
        [&format!("nexus:panel:{other}:out:notes"), "nexus:routes:changed", &format!("nexus:panel:{other}:calls")]
    {
        let refused = publish(&mut conn, channel).expect_err(channel);
        assert_eq!(refused.code(), Some("NOPERM"), "{channel}: {refused}");
    }
    let read: Option<String> =
        redis::cmd("GET").arg(format!("nexus:panel:{panel}")).query(&mut conn).expect("its record");
    assert!(read.is_some(), "its own record is readable");
    for listing in ["panel", "listers", "prompts", "resources"] {
        let key = format!("nexus:tools:{listing}:{panel}");
        redis::cmd("PEXPIRE").arg(&key).arg(60_000).query::<i64>(&mut conn).expect("its own listing");
    }
    let refused = [
        redis::cmd("HSET").arg(format!("nexus:tools:prompts:{other}")).arg("p").arg("{}").query::<()>(&mut conn),
        redis::cmd("HSET").arg(format!("nexus:tools:resources:{other}")).arg("r").arg("{}").query::<()>(&mut conn),
        redis::cmd("SET").arg(format!("nexus:panel:{panel}")).arg("{}").query::<()>(&mut conn),
        redis::cmd("GET").arg(format!("nexus:panel:{other}")).query::<()>(&mut conn),
        redis::cmd("HSET").arg("nexus:routes").arg(panel).arg("127.0.0.1:1").query::<()>(&mut conn),
        redis::cmd("FLUSHALL").query::<()>(&mut conn),
        redis::cmd("ACL").arg("SETUSER").arg("x").query::<()>(&mut conn),
        redis::cmd("KEYS").arg("*").query::<()>(&mut conn),
    ];
    for refused in refused {
        assert_eq!(refused.as_ref().err().and_then(|e| e.code()), Some("NOPERM"), "{refused:?}");
    }
    let foreign = redis::cmd("SUBSCRIBE").arg(format!("nexus:panel:{other}:calls")).query::<redis::Value>(&mut conn);
    assert_eq!(foreign.as_ref().err().and_then(|e| e.code()), Some("NOPERM"), "{foreign:?}");
}

/// Redis keeps no ACL users across a restart: the driver sets its running
/// sidecars' users again, so a sidecar logs in again by itself.
#[test]
fn a_sidecars_redis_user_is_back_after_redis_restarts() {
    if skipped("a_sidecars_redis_user_is_back_after_redis_restarts") {
        return;
    }
    let mut env = env("acl-restart", SandboxChoice::Process);
    let panel = panel_id();
    let instance = format!("acl-restart-{}", std::process::id());
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        driver.start(spec(&instance, &panel, code)).await.expect("start");
        let environ = helper_environment(&instance, "sidecar");
        let login = environ.lines().find_map(|l| l.strip_prefix("REDIS_URL=")).unwrap().to_owned();
        assert!(redis::Client::open(login.as_str()).unwrap().get_connection().is_ok(), "it logs in");

        env._brokers.redis.restart().expect("redis-server starts again");
        let deadline = Instant::now() + Duration::from_secs(30);
        while redis::Client::open(login.as_str()).unwrap().get_connection().is_err() {
            assert!(Instant::now() < deadline, "the sidecar's user never came back");
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// Where the driver makes `instance`'s cgroup (its memory controller's on
/// cgroups v1): below this process's own.
fn instance_cgroup(instance: &str) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let root = Path::new("/sys/fs/cgroup");
    let (base, path) = match root.join("cgroup.controllers").exists() {
        true => (root.to_owned(), own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_owned()),
        false => {
            let line = own.lines().find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")));
            (root.join("memory"), line.unwrap().splitn(3, ':').nth(2).unwrap().to_owned())
        }
    };
    // On v2 the driver's process has moved to a leaf beside its instances.
    base.join(path.trim_start_matches('/').trim_end_matches("nexus-node")).join(format!("nexus-{instance}"))
}

/// The environment of `instance`'s helper `name` (sidecar, watchdog), a
/// variable a line.
fn helper_environment(instance: &str, name: &str) -> String {
    let helper = processes_mentioning(instance).into_iter().find(|p| p.contains(&format!(" {name} ")));
    let pid = helper.unwrap_or_else(|| panic!("no {name}")).split(':').next().unwrap().to_owned();
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).replace('\0', "\n")
}
