"""Checks the Kubernetes manifests under the given directory without a
cluster: each kustomization overlay (one that is not another's base), each
overlay with each optional component (kind: Component) added, and the
kustomizations of CONTEXT with the objects they expect a cluster to have.

Built-in kinds are validated strictly against the Kubernetes OpenAPI
schemas of the oldest and newest versions we support (kubernetes-validate).
Custom resources are validated against their CRDs' schemas, extracted
unchanged into schemas/ from the oldest release each manifest says it
supports (KEDA 2.18.0, Prometheus Operator 0.68.0), strictly: a field the
schema does not know is an error, as with `kubectl apply
--validate=strict`. KEDA fields that a ScaledObject accepts but ignores in
the way ours is set up (pacing of scaling to zero while minReplicaCount is
above it; a fallback with only cpu or memory triggers) are errors too.

Then the references between objects: ConfigMaps and Secrets used exist,
probes name real ports, selectors match the pods, autoscalers target a
Deployment (one autoscaler each), the KEDA trigger watches the jobs queue
of the configured prefix, the pod's grace period outlasts the worker's own
shutdown grace, and Prometheus Operator monitors select the Service or pods
they mean, by a port name those have, with the job label the alert rules
expect (deploy/prometheus/prometheus.yml's job names). With kubectl on
PATH, `kubectl kustomize` must also accept each overlay."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-2.18.0-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-2.18.0-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-0.68.0-servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-0.68.0-podmonitor.json",
}
# Kustomizations applied on top of an installed overlay, with the
# kustomization whose objects they use.
CONTEXT = {"campaign-jobs": "base"}
PROMETHEUS_CONFIG = os.path.join(os.path.dirname(SCHEMAS), "..", "prometheus", "prometheus.yml")


def kustomization(directory):
    with open(os.path.join(directory, "kustomization.yaml"), encoding="utf-8") as file:
        return yaml.safe_load(file)


def resources(directory):
    """The documents a kustomization directory lists, bases and components
    included."""
    listed = kustomization(directory)
    for entry in listed.get("resources", []) + listed.get("components", []):
        path = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(path):
            yield from resources(path)
        else:
            with open(path, encoding="utf-8") as file:
                for doc in yaml.safe_load_all(file):
                    if doc:
                        yield path, doc


def duration_seconds(text):
    """Seconds in a humantime duration such as "90s" or "2m"."""
    units = {"s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)([smh])", text)
    if not match:
        raise ValueError(f"cannot read duration {text!r}")
    return int(match[1]) * units[match[2]]


def strict(schema):
    """`schema` with unknown fields forbidden wherever it lists the known
    ones and does not ask to keep unknown fields, as the API server does
    with strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version, kind):
    name = CRD_SCHEMAS.get((api_version, kind))
    if name is None:
        return None
    with open(os.path.join(SCHEMAS, name), encoding="utf-8") as file:
        return jsonschema.Draft7Validator(strict(json.load(file)))


def schema_problems(path, doc):
    where = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    validator = crd_validator(doc.get("apiVersion"), doc.get("kind"))
    if validator is not None:
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            yield f"{where}: {error.message} at {'.'.join(map(str, error.path)) or '(top)'}"
        if doc["kind"] == "ScaledObject":
            yield from (f"{where}: {p}" for p in scaled_object_problems(doc["spec"]))
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            yield f"{where}: Kubernetes {version}: {error.message} at {'.'.join(map(str, error.path))}"
        except kubernetes_validate.SchemaNotFoundError:
            yield f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}"


def scaled_object_problems(spec):
    """What KEDA's schema allows but its documentation says is ignored."""
    min_replicas = spec.get("minReplicaCount", 0)
    if min_replicas > spec.get("maxReplicaCount", 100):
        yield "minReplicaCount above maxReplicaCount"
    scales_to_zero = min_replicas == 0 or "idleReplicaCount" in spec
    for field in ("cooldownPeriod", "initialCooldownPeriod"):
        if field in spec and not scales_to_zero:
            yield f"spec.{field} has no effect: KEDA applies it only when scaling to zero, and minReplicaCount is {min_replicas}"
    caches = any(t.get("useCachedMetrics") for t in spec.get("triggers", []))
    if "pollingInterval" in spec and not scales_to_zero and not caches:
        yield f"spec.pollingInterval has no effect on scaling: with minReplicaCount {min_replicas} the HPA polls the metrics"
    if "fallback" in spec and all(t.get("type") in ("cpu", "memory") for t in spec.get("triggers", [])):
        yield "spec.fallback has no effect: KEDA has no fallback for cpu or memory triggers"


def pod_specs(objects):
    for (kind, name), doc in objects.items():
        if kind in ("Deployment", "Job"):
            yield f"{kind} {name}", doc["spec"]["template"]


def reference_problems(objects):
    def has(kind, name):
        return (kind, name) in objects

    def data_keys(kind, name):
        doc = objects[kind, name]
        return set(doc.get("data", {})) | set(doc.get("stringData", {}))

    config = objects.get(("ConfigMap", "flotilla-config"), {}).get("data", {})
    for where, template in pod_specs(objects):
        spec = template["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            for kind, key, field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if key not in volume:
                    continue
                source = volume[key][field]
                if not has(kind, source):
                    yield f"{where}: volume {volume['name']} needs {kind} {source}"
                    continue
                for item in volume[key].get("items", []):
                    if item["key"] not in data_keys(kind, source):
                        yield f"{where}: volume {volume['name']} needs key {item['key']} of {kind} {source}"
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    yield f"{where}: container {container['name']} mounts volume {mount['name']}, which the pod does not declare"
            for source in container.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source and not has(kind, source[key]["name"]):
                        yield f"{where}: envFrom needs {kind} {source[key]['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for e in container.get("env", []):
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = (e.get("valueFrom") or {}).get(key)
                    if ref and not (has(kind, ref["name"]) and ref["key"] in data_keys(kind, ref["name"])):
                        yield f"{where}: {e['name']} needs key {ref['key']} of {kind} {ref['name']}"
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = ((container.get(probe) or {}).get("httpGet") or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    yield f"{where}: {probe} uses port {port!r}, which the container does not name"
            if container in spec.get("initContainers", []):
                continue
            grace = env.get("FLOTILLA_SHUTDOWN_GRACE") or config.get("FLOTILLA_SHUTDOWN_GRACE")
            if grace is None and where.startswith("Deployment"):
                yield f"{where}: set FLOTILLA_SHUTDOWN_GRACE, so the pod's grace can be checked against it"
            elif grace and spec.get("terminationGracePeriodSeconds", 30) <= duration_seconds(grace):
                yield f"{where}: terminationGracePeriodSeconds must outlast FLOTILLA_SHUTDOWN_GRACE={grace}"

    deployments = {name: doc for (kind, name), doc in objects.items() if kind == "Deployment"}
    for (kind, name), doc in objects.items():
        selector = None
        if kind == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        elif kind == "Service":
            selector = doc["spec"].get("selector")
        if selector is not None:
            matched = [d for d, dep in deployments.items()
                       if selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()]
            if not matched:
                yield f"{kind} {name}: selector {selector} matches no Deployment's pods"

    scalers = {}
    for (kind, name), doc in objects.items():
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = doc["spec"]["scaleTargetRef"]["name"]
            if target not in deployments:
                yield f"{kind} {name}: scales {target}, which is no Deployment here"
            if target in scalers:
                yield f"{kind} {name} and {scalers[target]} both scale {target}"
            scalers[target] = f"{kind} {name}"
        if kind == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] != "rabbitmq":
                    continue
                expected = f"{config.get('FLOTILLA_PREFIX', 'flotilla')}.jobs"
                if trigger["metadata"].get("queueName") != expected:
                    yield f"ScaledObject {name}: watches {trigger['metadata'].get('queueName')}, not {expected}"
                auth = (trigger.get("authenticationRef") or {}).get("name")
                if auth and not has("TriggerAuthentication", auth):
                    yield f"ScaledObject {name}: no TriggerAuthentication {auth}"
        if kind == "TriggerAuthentication":
            for ref in doc["spec"].get("secretTargetRef", []):
                if not (has("Secret", ref["name"]) and ref["key"] in data_keys("Secret", ref["name"])):
                    yield f"TriggerAuthentication {name}: needs key {ref['key']} of Secret {ref['name']}"


def prometheus_jobs():
    with open(PROMETHEUS_CONFIG, encoding="utf-8") as file:
        return {job["job_name"] for job in yaml.safe_load(file)["scrape_configs"]}


def monitor_problems(objects):
    """Prometheus Operator monitors: each must reach pods by a port name
    they have, and label their series with the job that Prometheus gets in
    docker-compose (prometheus.yml), the pods' app.kubernetes.io/name,
    which the alert rules select on."""
    jobs = prometheus_jobs()

    def pods_of(selector):
        return [(where, template) for where, template in pod_specs(objects)
                if selector.items() <= template["metadata"].get("labels", {}).items()]

    def job_problems(where, job, templates):
        for pod_where, template in templates:
            expected = template["metadata"].get("labels", {}).get("app.kubernetes.io/name")
            if job != expected or job not in jobs:
                yield (f"{where}: series of {pod_where} get job={job!r}; the alert rules expect "
                       f"{expected!r}, one of prometheus.yml's jobs {sorted(jobs)}")

    for (kind, name), doc in objects.items():
        spec = doc.get("spec", {})
        where = f"{kind} {name}"
        if kind == "ServiceMonitor":
            selector = spec["selector"].get("matchLabels", {})
            services = [(n, d) for (k, n), d in objects.items()
                        if k == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()]
            if not services:
                yield f"{where}: selector {selector} matches no Service's labels"
            for service_name, service in services:
                ports = {p.get("name") for p in service["spec"].get("ports", [])}
                for endpoint in spec["endpoints"]:
                    if endpoint.get("port") not in ports:
                        yield f"{where}: Service {service_name} has no port named {endpoint.get('port')!r}"
                labels = service["metadata"].get("labels", {})
                job = labels.get(spec.get("jobLabel"), service_name)
                templates = pods_of(service["spec"].get("selector") or {})
                yield from job_problems(where, job, templates)
        elif kind == "PodMonitor":
            selector = spec["selector"].get("matchLabels", {})
            templates = pods_of(selector)
            if not templates:
                yield f"{where}: selector {selector} matches no pods"
            for pod_where, template in templates:
                ports = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
                for endpoint in spec["podMetricsEndpoints"]:
                    if endpoint.get("port") not in ports:
                        yield f"{where}: {pod_where} has no container port named {endpoint.get('port')!r}"
                labels = template["metadata"].get("labels", {})
                default = f"{doc['metadata'].get('namespace', '<namespace>')}/{name}"
                job = labels.get(spec.get("jobLabel"), default)
                yield from job_problems(where, job, [(pod_where, template)])


def overlays(root):
    """Kustomization directories that no other one uses as a base, and
    components (which are no overlay on their own)."""
    dirs = {d for d, _, files in os.walk(root) if "kustomization.yaml" in files}
    bases, components = set(), set()
    for d in dirs:
        listed = kustomization(d)
        if listed.get("kind") == "Component":
            components.add(d)
        for entry in listed.get("resources", []):
            bases.add(os.path.normpath(os.path.join(d, entry)))
    return sorted(dirs - bases - components), sorted(components)


def check(name, sources):
    """Problems of the objects of `sources` (kustomization directories)
    taken together, and how many objects there are."""
    found, objects = [], {}
    for source in sources:
        for path, doc in resources(source):
            key = (doc["kind"], doc["metadata"]["name"])
            if key in objects:
                found.append(f"{path}: {key[0]} {key[1]} defined twice")
            objects[key] = doc
            found.extend(schema_problems(path, doc))
    found.extend(reference_problems(objects))
    found.extend(monitor_problems(objects))
    for problem in found:
        print(f"{name}: {problem}")
    if not found:
        print(f"{name}: {len(objects)} objects OK")
    return bool(found)


def kustomize_problems(kubectl, overlay, components):
    """What `kubectl kustomize` says of `overlay` with `components` added
    (through a kustomization of its own in a temporary directory, in the
    overlay's namespace, as if they were listed in the overlay)."""
    with tempfile.TemporaryDirectory() as scratch:
        target = overlay
        if components:
            target = scratch
            listed = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(overlay, scratch)],
                "components": [os.path.relpath(c, scratch) for c in components],
            }
            if "namespace" in kustomization(overlay):
                listed["namespace"] = kustomization(overlay)["namespace"]
            with open(os.path.join(scratch, "kustomization.yaml"), "w", encoding="utf-8") as file:
                yaml.safe_dump(listed, file)
        rendered = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", target],
                                  capture_output=True, text=True)
    return [] if rendered.returncode == 0 else [f"kubectl kustomize: {rendered.stderr.strip()}"]


def main(root):
    failed = False
    kubectl = shutil.which("kubectl")
    tops, components = overlays(root)
    for overlay in tops:
        context = CONTEXT.get(os.path.basename(overlay))
        sources = [overlay] if context is None else [os.path.join(root, context), overlay]
        failed |= check(overlay, sources)
        variants = [[]] if context else [[]] + [[c] for c in components]
        for added in variants:
            name = " + ".join([overlay] + added)
            if added:
                failed |= check(name, sources + added)
            if kubectl:
                for problem in kustomize_problems(kubectl, overlay, added):
                    print(f"{name}: {problem}")
                    failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
