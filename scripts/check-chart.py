"""Lints the chart strictly and renders it with Helm v4's SDK
(helm-python-sdk) for the default values and each given value file; each
rendering is validated with kubernetes-validate --strict, and the custom
resources (ServiceMonitor, KEDA's ScaledObject), which it does not know, by
their shape. The in-chart NATS is checked as a cluster: its nodes, routes,
anti-affinity and PDB, every stream's replicas, and its rendered
configuration accepted by nats-server. A value the schema forbids, or one
the chart refuses (a PostgreSQL connection budget exceeded, more stream
replicas than nodes), must fail the render."""

import os
import subprocess
import sys
import tempfile

import helm_python
import yaml

KUBERNETES = "1.34.0"


def render(chart_path, values, name="shop"):
    chart = helm_python.Chart.load(chart_path)
    try:
        return chart.render(values, name=name, namespace="shop", is_install=True)
    finally:
        chart.close()


STREAMS = {"USER", "ORDER", "INVENTORY", "PAYMENT"}
# The streams each service's durable consumer reads.
CONSUMES = {"user": set(), "order": {"USER", "INVENTORY", "PAYMENT"},
            "inventory": {"ORDER", "PAYMENT"}, "payment": {"USER", "INVENTORY", "ORDER"}}
NATS_JETSTREAM_KEYS = {"natsServerMonitoringEndpoint", "account", "stream", "consumer",
                       "lagThreshold", "activationLagThreshold", "useHttps"}


def check_scaled_object(doc, docs):
    """KEDA's ScaledObject, by the shape its CRD (keda.sh/v1alpha1) gives."""
    name = doc["metadata"]["name"]
    assert doc["apiVersion"] == "keda.sh/v1alpha1", doc
    spec = doc["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                         "pollingInterval", "cooldownPeriod", "triggers", "advanced"}, spec
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    target = deployments[spec["scaleTargetRef"]["name"]]
    assert "replicas" not in target["spec"], f"{name}: the Deployment fixes its replicas"
    assert not any(d["kind"] == "HorizontalPodAutoscaler"
                   and d["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]
                   for d in docs), f"{name}: an HPA of its own as well"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], spec
    assert isinstance(spec["pollingInterval"], int), spec
    component = target["metadata"]["labels"]["app.kubernetes.io/component"]
    streams = set()
    for trigger in spec["triggers"]:
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), trigger
        if trigger["type"] == "cpu":
            assert trigger["metricType"] == "Utilization" and int(metadata["value"]) > 0, trigger
        elif trigger["type"] == "nats-jetstream":
            assert set(metadata) <= NATS_JETSTREAM_KEYS, trigger
            host, port = metadata["natsServerMonitoringEndpoint"].rsplit(":", 1)
            assert host and port.isdigit() and "/" not in host, trigger
            assert metadata["account"] == "$G", trigger
            assert metadata["consumer"] == component, trigger
            assert int(metadata["lagThreshold"]) > 0, trigger
            streams.add(metadata["stream"])
        else:
            raise AssertionError(f"{name}: trigger {trigger['type']}")
    assert streams == CONSUMES[component], f"{name}: lag of {streams}"


def check_nats(docs, label):
    """The in-chart NATS: a cluster when it has several nodes, and every
    stream with as many replicas as it has nodes (at most 3)."""
    sets = [d for d in docs if d["kind"] == "StatefulSet"
            and d["metadata"]["labels"]["app.kubernetes.io/component"] == "nats"]
    replicas = {env["value"] for d in docs if d["kind"] in ("Deployment", "Job")
                for c in d["spec"]["template"]["spec"]["containers"]
                for env in c.get("env", []) if env["name"] == "STREAM_REPLICAS"}
    if not sets:
        assert len(replicas) == 1, f"{label}: stream replicas {replicas}"
        print(f"  {label}: external NATS, R{replicas.pop()} streams")
        return
    nats = sets[0]
    nodes = nats["spec"]["replicas"]
    pod = nats["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    routes = [a for a in args if a.startswith("--routes=")]
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"
               and d["metadata"]["labels"]["app.kubernetes.io/component"] == "nats"]
    assert replicas == {str(min(nodes, 3))}, f"{label}: stream replicas {replicas} on {nodes} nodes"
    if nodes > 1:
        headless = nats["spec"]["serviceName"]
        service = next(d for d in docs if d["kind"] == "Service"
                       and d["metadata"]["name"] == headless)
        assert service["spec"]["clusterIP"] == "None", service
        assert service["spec"]["publishNotReadyAddresses"], service
        assert nats["spec"]["podManagementPolicy"] == "Parallel", nats["spec"]
        urls = routes[0].split("=", 1)[1].split(",")
        assert urls == [f"nats://{nats['metadata']['name']}-{i}.{headless}.shop.svc.cluster.local:6222"
                        for i in range(nodes)], urls
        assert "podAntiAffinity" in pod["affinity"], pod
        assert budgets and budgets[0]["spec"]["maxUnavailable"] == 1, budgets
    else:
        assert not routes and not budgets and "affinity" not in pod, label
    config = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"] == pod["volumes"][0]["configMap"]["name"])
    with tempfile.TemporaryDirectory() as tmp:
        for file, text in config["data"].items():
            with open(f"{tmp}/{file}", "w") as f:
                f.write(text)
        passwords = {f"NATS_PASSWORD_{u}": "x"
                     for u in ("USER", "ORDER", "INVENTORY", "PAYMENT", "SHOPCTL")}
        result = subprocess.run(["nats-server", "-c", f"{tmp}/server.conf", "-t"],
                                capture_output=True, text=True, env={**os.environ, **passwords})
        if result.returncode != 0:
            sys.exit(f"{label}: nats-server refuses the chart's configuration:\n{result.stderr}")
    sync = config["data"]["server.conf"].split("sync_interval:")[1].split()[0].strip('"')
    print(f"  {label}: NATS {nodes} node(s), R{min(nodes, 3)} streams, sync_interval {sync}")
    return sync


def service_env(manifests, service):
    """A service container's environment, as rendered."""
    docs = yaml.safe_load_all(manifests["shop/templates/services.yaml"])
    deployment = next(d for d in docs if d and d["kind"] == "Deployment"
                      and d["metadata"]["name"].endswith(service))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def validate(manifests, label):
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        kinds = []
        docs = [doc for template, text in sorted(manifests.items())
                if not template.endswith("NOTES.txt") and text.strip()
                for doc in yaml.safe_load_all(text) if doc]
        for doc in docs:
            kinds.append(doc["kind"])
            # Custom resources: Kubernetes' own schemas do not know them.
            if doc["kind"] == "ServiceMonitor":
                assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc
                continue
            if doc["kind"] == "ScaledObject":
                check_scaled_object(doc, docs)
                continue
            path = f"{tmp}/{len(paths):03}.yaml"
            with open(path, "w") as f:
                yaml.safe_dump(doc, f)
            paths.append(path)
        result = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", KUBERNETES, *paths],
            capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{label}: kubernetes-validate failed:\n{result.stdout}{result.stderr}")
        print(f"  {label}: {len(kinds)} objects valid for Kubernetes {KUBERNETES}: "
              + ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))))
        check_nats(docs, label)
        return kinds


def main():
    chart_path, value_files = sys.argv[1], sys.argv[2:]
    result = helm_python.lint(chart_path, strict=True)
    # Severities as Helm counts them: 1 info, 2 warning, 3 error.
    problems = [m for m in result["messages"] if m["severity"] >= 2]
    if result["errors"] or problems:
        sys.exit(f"helm lint --strict: {result['errors']} {problems}")
    notes = "; ".join(m["error"] for m in result["messages"])
    print(f"  helm lint --strict: ok{f' (info: {notes})' if notes else ''}")

    # The one value without a default: whom to trust.
    trust = {"auth": {"issuer": "shopctl", "jwks": '{"keys": []}'}}
    kinds = validate(render(chart_path, trust), "default values (and auth)")
    assert kinds.count("Deployment") == 4 and kinds.count("StatefulSet") == 2, kinds
    # No free money in production: wallets open empty unless a value says so.
    credit = service_env(render(chart_path, trust), "payment")["STARTING_CREDIT_CENTS"]
    assert credit == "0", f"STARTING_CREDIT_CENTS renders {credit!r} by default"
    demo = {**trust, "services": {"payment": {"env": {"STARTING_CREDIT_CENTS": "5000"}}}}
    assert service_env(render(chart_path, demo), "payment")["STARTING_CREDIT_CENTS"] == "5000"
    print("  starting credit: 0 by default, 5000 when set")
    # Payments through a provider: its settings reach the payment service
    # only, the key and the webhook secret from the Secret named.
    assert "PAYMENT_PROVIDER" not in service_env(render(chart_path, trust), "payment")
    provider = {**trust, "paymentProvider": {"enabled": True, "url": "https://api.psp.example",
                                             "existingSecret": "psp"}}
    manifests = render(chart_path, provider)
    env = service_env(manifests, "payment")
    assert env["PAYMENT_PROVIDER"] == "http" and env["PROVIDER_URL"] == "https://api.psp.example", env
    assert env["PROVIDER_TIMEOUT_MS"] == "5000" and env["PROVIDER_CURRENCY"] == "EUR", env
    docs = yaml.safe_load_all(manifests["shop/templates/services.yaml"])
    payment = next(d for d in docs if d and d["kind"] == "Deployment"
                   and d["metadata"]["name"].endswith("payment"))
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]
               for e in payment["spec"]["template"]["spec"]["containers"][0]["env"]
               if "valueFrom" in e}
    assert secrets["PROVIDER_API_KEY"] == {"name": "psp", "key": "api-key"}, secrets
    assert secrets["PROVIDER_WEBHOOK_SECRET"] == {"name": "psp", "key": "webhook-secret"}, secrets
    assert "PAYMENT_PROVIDER" not in service_env(manifests, "order")
    validate(manifests, "paymentProvider enabled")
    print("  payment provider: off by default; on, its URL and the Secret's key and webhook secret")
    for path in value_files:
        values = yaml.safe_load(open(path))
        manifests = render(chart_path, values)
        kinds = validate(manifests, path)
        assert kinds.count("Deployment") == 4, kinds
        # A private CA for the keys' URL reaches every service.
        if values.get("auth", {}).get("jwksCa"):
            assert "ConfigMap" in kinds, kinds
            for service in ("user", "order", "inventory", "payment"):
                env = service_env(manifests, service)
                assert env["JWKS_CA"] == "/etc/shop/jwks-ca/ca.crt", env
            print(f"  {path}: the keys' URL trusts the given CA (JWKS_CA)")

    # A wrong value fails at install time, naming the field.
    for wrong in ({"logFormat": "xml"}, {"services": {"order": {"replicas": "three"}}},
                  {"nats": {"enabled": False, "url": "http://wrong"}},
                  {"auth": {"issuer": "", "jwks": ""}},
                  {"auth": {"issuer": "idp", "jwksUrl": "ftp://idp/certs"}},
                  # Keys over plain HTTP: anyone on the path could mint tokens.
                  {"auth": {"issuer": "idp", "jwksUrl": "http://keycloak:8080/certs"}},
                  {"auth": {"issuer": "idp", "jwks": "{}", "jwksCa": "-----BEGIN CERTIFICATE-----"}},
                  {"auth": {"issuer": "idp", "jwksUrl": "https://idp/certs", "jwksCa": "not PEM"}},
                  # 21 replicas x 18 connections, beyond 190.
                  {"services": {"order": {"replicas": 20}}},
                  {"nats": {"replicas": 1, "streamReplicas": 3}},
                  {"nats": {"replicas": 2}},
                  # The provider's API key over plain HTTP; no Secret named.
                  {"paymentProvider": {"enabled": True, "url": "http://psp", "existingSecret": "psp"}},
                  {"auth": {"issuer": "idp", "jwks": "{}"},
                   "paymentProvider": {"enabled": True, "url": "https://psp"}}):
        try:
            render(chart_path, wrong)
        except helm_python.HelmError as error:
            print(f"  refused {wrong}: {str(error).splitlines()[0][:120]}")
        else:
            sys.exit(f"the chart accepted the wrong values {wrong}")


main()
