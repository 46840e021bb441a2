"""Checks the Kubernetes manifests of each kustomization overlay under the
given directory (those that are not another's base), without a cluster.

Built-in kinds are validated strictly against the Kubernetes OpenAPI
schemas of the oldest and newest versions we support (kubernetes-validate).
Custom resources have no schema there: KEDA's ScaledObject and
TriggerAuthentication get a structural check of the fields we use instead.
Then the references between objects: ConfigMaps and Secrets used exist,
probes name real ports, selectors match the pods, autoscalers target a
Deployment (one autoscaler each), the KEDA trigger watches the jobs queue
of the configured prefix, and the pod's grace period outlasts the worker's
own shutdown grace. With kubectl on PATH, `kubectl kustomize` must also
accept each overlay."""

import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_API = "keda.sh/v1alpha1"


def resources(directory):
    """The documents a kustomization directory lists, bases included."""
    with open(os.path.join(directory, "kustomization.yaml"), encoding="utf-8") as file:
        kustomization = yaml.safe_load(file)
    for entry in kustomization.get("resources", []):
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


def schema_problems(path, doc):
    where = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") == KEDA_API:
        yield from (f"{where}: {p}" for p in keda_problems(doc))
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            yield f"{where}: Kubernetes {version}: {error.message} at {'.'.join(map(str, error.path))}"
        except kubernetes_validate.SchemaNotFoundError:
            yield f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}"


def keda_problems(doc):
    spec = doc.get("spec") or {}
    if not doc.get("metadata", {}).get("name"):
        yield "no metadata.name"
    if doc["kind"] == "ScaledObject":
        if not (spec.get("scaleTargetRef") or {}).get("name"):
            yield "no spec.scaleTargetRef.name"
        for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            if field in spec and not isinstance(spec[field], int):
                yield f"spec.{field} is not an integer"
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            yield "minReplicaCount above maxReplicaCount"
        fallback = spec.get("fallback")
        if fallback is not None and not all(isinstance(fallback.get(k), int) for k in ("failureThreshold", "replicas")):
            yield "spec.fallback needs integer failureThreshold and replicas"
        triggers = spec.get("triggers") or []
        if not triggers:
            yield "no triggers"
        for trigger in triggers:
            if not trigger.get("type"):
                yield "a trigger without type"
            metadata = trigger.get("metadata") or {}
            if not all(isinstance(v, str) for v in metadata.values()):
                yield f"trigger {trigger.get('type')}: metadata values must be strings"
    elif doc["kind"] == "TriggerAuthentication":
        refs = spec.get("secretTargetRef") or []
        if not refs:
            yield "no spec.secretTargetRef"
        for ref in refs:
            if not all(ref.get(k) for k in ("parameter", "name", "key")):
                yield "secretTargetRef entries need parameter, name and key"
    else:
        yield "unknown KEDA kind"


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
        for volume in spec.get("volumes", []):
            for kind, key, field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if key in volume and not has(kind, volume[key][field]):
                    yield f"{where}: volume {volume['name']} needs {kind} {volume[key][field]}"
        for container in spec["containers"]:
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


def overlays(root):
    """Kustomization directories that no other one uses as a base."""
    dirs = {d for d, _, files in os.walk(root) if "kustomization.yaml" in files}
    bases = set()
    for d in dirs:
        with open(os.path.join(d, "kustomization.yaml"), encoding="utf-8") as file:
            for entry in yaml.safe_load(file).get("resources", []):
                bases.add(os.path.normpath(os.path.join(d, entry)))
    return sorted(dirs - bases)


def main(root):
    failed = False
    kubectl = shutil.which("kubectl")
    for overlay in overlays(root):
        found, objects = [], {}
        for path, doc in resources(overlay):
            key = (doc["kind"], doc["metadata"]["name"])
            if key in objects:
                found.append(f"{path}: {key[0]} {key[1]} defined twice")
            objects[key] = doc
            found.extend(schema_problems(path, doc))
        found.extend(reference_problems(objects))
        if kubectl:
            rendered = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True)
            if rendered.returncode != 0:
                found.append(f"kubectl kustomize: {rendered.stderr.strip()}")
        for problem in found:
            print(f"{overlay}: {problem}")
        if not found:
            print(f"{overlay}: {len(objects)} objects OK")
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
