//! The deployment files hold together: every docker-compose command is one the real `rollcall`
//! command line accepts, every address points at a service that exists, and the Dockerfile
//! copies what the binary embeds. (No container engine runs in CI; this checks the files.)

use std::collections::BTreeSet;

use clap::Parser;
use rollcall::cli::Cli;
use serde_yaml_ng::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml");
    let mut doc: Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    doc.apply_merge().expect("merge keys resolve");
    let services = doc["services"].as_mapping().expect("services").clone();
    let mut merged = serde_yaml_ng::Mapping::new();
    for (name, mut service) in services {
        service.apply_merge().expect("merge keys resolve");
        merged.insert(name, service);
    }
    Value::Mapping(merged)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn flag(command: &[String], name: &str) -> Option<String> {
    command
        .iter()
        .position(|a| a == name)
        .and_then(|i| command.get(i + 1).cloned())
}

#[test]
fn compose_has_the_whole_topology_and_every_command_parses() {
    let services = compose();
    let names: BTreeSet<String> = services
        .as_mapping()
        .expect("mapping")
        .keys()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    for expected in [
        "redis1",
        "redis2",
        "redis3",
        "sentinel1",
        "sentinel2",
        "sentinel3",
        "registry1",
        "registry2",
        "registry3",
        "lb",
        "gateway",
        "prometheus",
    ] {
        assert!(
            names.contains(expected),
            "missing service {expected}: {names:?}"
        );
    }
    let host_exists = |addr: &str| {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        names.contains(host)
    };
    for name in &names {
        let service = &services[name.as_str()];
        assert_eq!(
            service["build"].as_str(),
            Some("."),
            "{name} builds this repo"
        );
        let command = strings(&service["command"]);
        assert_eq!(
            command.first().map(String::as_str),
            Some("rollcall"),
            "{name}"
        );
        let env = &service["environment"];
        // Environment variables are flags too; clap reads them, so set them for the parse.
        let vars: Vec<(String, String)> = env
            .as_mapping()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        for (_, value) in vars.iter().filter(|(k, _)| k == "ROLLCALL_SENTINELS") {
            for addr in value.split(',') {
                assert!(host_exists(addr), "{name}: {addr} is not a service");
            }
        }
        Cli::try_parse_from(&command)
            .unwrap_or_else(|e| panic!("{name}: `{}` does not parse: {e}", command.join(" ")));
        for key in ["--master", "--replica-of"] {
            if let Some(addr) = flag(&command, key) {
                assert!(host_exists(&addr), "{name}: {key} {addr} is not a service");
            }
        }
        if let Some(url) = flag(&command, "--registry-url") {
            let host = url.trim_start_matches("http://");
            assert!(
                host_exists(host),
                "{name}: --registry-url {url} is not a service"
            );
        }
        for key in ["--registries", "--gateways"] {
            if let Some(list) = flag(&command, key) {
                for addr in list.split(',') {
                    assert!(host_exists(addr), "{name}: {key} {addr} is not a service");
                }
            }
        }
        if let Some(list) = flag(&command, "--upstreams") {
            let ups: Vec<&str> = list.split(',').collect();
            assert_eq!(ups.len(), 3, "{name}: nginx balances three replicas");
            for addr in ups {
                assert!(
                    host_exists(addr),
                    "{name}: upstream {addr} is not a service"
                );
            }
        }
    }
    assert_eq!(strings(&services["lb"]["ports"]), vec!["8888:8888"]);
}

#[test]
fn dockerfile_copies_what_the_binary_embeds() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    for dir in ["src", "nginx", "redis-sentinel", "prometheus"] {
        assert!(
            dockerfile.contains(&format!("COPY {dir} ./{dir}")),
            "the build stage must copy {dir}/ (include_str! reads it)"
        );
    }
    for package in ["redis-server", "redis-sentinel", "nginx"] {
        assert!(dockerfile.contains(package), "the image installs {package}");
    }
}
