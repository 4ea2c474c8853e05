"""Lints the chart strictly and renders it with Helm v4's SDK
(helm-python-sdk) for the default values and each given value file; each
rendering is validated with kubernetes-validate --strict. A value the
schema forbids must fail the render."""

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


def validate(manifests, label):
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        kinds = []
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt") or not text.strip():
                continue
            for i, doc in enumerate(d for d in yaml.safe_load_all(text) if d):
                kinds.append(doc["kind"])
                if doc["kind"] == "ServiceMonitor":
                    # A CRD: Kubernetes' own schemas do not know it.
                    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc
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
    for path in value_files:
        values = yaml.safe_load(open(path))
        kinds = validate(render(chart_path, values), path)
        assert kinds.count("Deployment") == 4, kinds

    # A wrong value fails at install time, naming the field.
    for wrong in ({"logFormat": "xml"}, {"services": {"order": {"replicas": "three"}}},
                  {"nats": {"enabled": False, "url": "http://wrong"}},
                  {"auth": {"issuer": "", "jwks": ""}},
                  {"auth": {"issuer": "idp", "jwksUrl": "ftp://idp/certs"}}):
        try:
            render(chart_path, wrong)
        except helm_python.HelmError as error:
            print(f"  refused {wrong}: {str(error).splitlines()[0][:120]}")
        else:
            sys.exit(f"the chart accepted the wrong values {wrong}")


main()
