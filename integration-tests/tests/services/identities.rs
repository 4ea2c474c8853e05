//! Each service is named once, in its `SERVICE` constant; the files that
//! must repeat it — the NATS configuration (its user, subjects, stream and
//! reply inbox), the Helm chart (its ports, the lists its templates loop
//! over) and `compose.yaml` (its command, NATS user and ports) — agree with
//! the constants, so that renaming a service or moving a port fails here
//! rather than at deployment.

use shop_service::Identity;

const SERVICES: [Identity; 4] = [
    shop_user::SERVICE,
    shop_order::SERVICE,
    shop_inventory::SERVICE,
    shop_payment::SERVICE,
];

fn read(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The lines under `key:` indented deeper than it, from the first line of
/// `text` that is `key:` at `indent` spaces (after `after`, if given).
fn block<'a>(text: &'a str, indent: usize, key: &str, after: Option<&str>) -> Vec<&'a str> {
    let mut lines = text.lines();
    if let Some(after) = after {
        lines.by_ref().find(|line| *line == after).unwrap();
    }
    let head = format!("{}{key}:", " ".repeat(indent));
    lines
        .by_ref()
        .find(|line| *line == head)
        .unwrap_or_else(|| panic!("no `{head}`"));
    lines
        .take_while(|line| line.is_empty() || line.len() - line.trim_start().len() > indent)
        .collect()
}

#[test]
fn names_are_unique_and_their_streams_say_so() {
    for (i, service) in SERVICES.iter().enumerate() {
        assert_eq!(service.stream, service.name.to_uppercase());
        assert_eq!(service.source(), format!("shop/{}", service.name));
        for other in &SERVICES[i + 1..] {
            assert_ne!(service.name, other.name);
            assert_ne!(service.ports.grpc, other.ports.grpc);
            assert_ne!(service.ports.http, other.ports.http);
        }
    }
}

#[test]
fn the_nats_configuration_has_each_services_user_subjects_stream_and_inbox() {
    let conf = read("deploy/nats/nats.conf");
    for Identity { name, stream, .. } in SERVICES {
        // The user's block: from its `user:` line to the next user's.
        let start = conf
            .find(&format!("user: {name}\n"))
            .unwrap_or_else(|| panic!("no NATS user {name}"));
        let end = conf[start + 1..]
            .find("      user: ")
            .map_or(conf.len(), |at| start + 1 + at);
        let user = &conf[start..end];
        for expected in [
            format!("password: $NATS_PASSWORD_{}", name.to_uppercase()),
            format!("\"{name}.>\""),
            format!("\"dlq.{name}.>\""),
            format!("\"$JS.API.STREAM.CREATE.{stream}\""),
            format!("\"$JS.API.STREAM.INFO.{stream}\""),
            format!("\"_INBOX_{name}.>\""),
        ] {
            assert!(
                user.contains(&expected),
                "NATS user {name} lacks {expected}"
            );
        }
    }
}

#[test]
fn the_chart_has_each_services_ports_and_loops_over_all_four() {
    let values = read("helm/shop/values.yaml");
    for Identity { name, ports, .. } in SERVICES {
        let service = block(&values, 2, name, Some("services:"));
        assert!(
            service.contains(&format!("    grpcPort: {}", ports.grpc).as_str()),
            "{name}: {service:?}"
        );
        assert!(
            service.contains(&format!("    httpPort: {}", ports.http).as_str()),
            "{name}: {service:?}"
        );
    }
    let names: Vec<String> = SERVICES.iter().map(|s| format!("\"{}\"", s.name)).collect();
    let list = format!("list {}", names.join(" "));
    for template in ["nats.yaml", "postgresql.yaml", "secret.yaml"] {
        let text = read(&format!("helm/shop/templates/{template}"));
        assert!(text.contains(&list), "{template} does not loop over {list}");
    }
}

#[test]
fn compose_runs_each_service_with_its_user_and_ports() {
    let compose = read("compose.yaml");
    for Identity { name, ports, .. } in SERVICES {
        let service = block(&compose, 2, name, Some("services:")).join("\n");
        for expected in [
            format!("command: [\"{name}-svc\"]"),
            format!("NATS_USER: {name}"),
            format!("ports: [\"{0}:{0}\", \"{1}:{1}\"]", ports.grpc, ports.http),
        ] {
            assert!(
                service.contains(&expected),
                "compose's {name} lacks {expected}"
            );
        }
    }
}
