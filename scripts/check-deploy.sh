#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/kubernetes:
#  1. every document of every YAML file validates, strictly (unknown fields are errors), against
#     the pinned Kubernetes version's schema bundled in kubernetes-validate (PyPI; no network
#     needed after the install), and a kind or apiVersion without a schema is an error too;
#  2. kustomization.yaml lists every manifest (except *.example.yaml) and nothing missing;
#  3. every `--flag` in a container's command/args, every env[].name and every key a container
#     takes through envFrom (ConfigMap/Secret defined in deploy/kubernetes) appears in the output
#     of `picie serve --help`, and every configMapKeyRef/secretKeyRef names a defined key.
#   scripts/check-deploy.sh [PICIE_BIN]        (default target/debug/picie)
# Environment: K8S_VERSION (default pinned below), KV_VERSION (kubernetes-validate, pinned below).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/target/debug/picie}"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
# The oldest Kubernetes minor these manifests target; strict mode rejects newer fields.
K8S_VERSION="${K8S_VERSION:-1.33.0}"
KV_VERSION="${KV_VERSION:-1.37.0}"
PYYAML_VERSION=6.0.4
VENV="$ROOT/target/deploy-venv"
DIR="$ROOT/deploy/kubernetes"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" - "$KV_VERSION" "$PYYAML_VERSION" 2>/dev/null <<'PY'
import sys, yaml, kubernetes_validate.version as v
sys.exit(v.__version__ != sys.argv[1] or yaml.__version__ != sys.argv[2])
PY
then
  echo "check-deploy: installing kubernetes-validate $KV_VERSION and PyYAML $PYYAML_VERSION from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" "PyYAML==$PYYAML_VERSION"
fi

if [ ! -x "$BIN" ]; then
  echo "check-deploy: no picie binary at $BIN (build it with cargo build, or pass its path)" >&2
  exit 2
fi
HELP="$(mktemp)"
trap 'rm -f "$HELP"' EXIT
"$BIN" serve --help >"$HELP"

"$VENV/bin/python" - "$DIR" "$K8S_VERSION" "$HELP" "$ROOT" <<'PY'
import os, re, sys
import yaml
import kubernetes_validate.utils as kv

directory, k8s_version, help_path, root = sys.argv[1:5]
help_text = open(help_path).read()
errors = []
rel = lambda p: os.path.relpath(p, root)

# 1. Schema validation of every document.
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs
               if f.endswith((".yaml", ".yml")) and f not in ("kustomization.yaml", "kustomization.yml"))
resources = []  # (file, resource)
validated = None
for path in files:
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        errors.append(f"{rel(path)}: not valid YAML: {e}")
        continue
    if not docs:
        errors.append(f"{rel(path)}: no documents")
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"{rel(path)}: a document without apiVersion and kind")
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
        try:
            validated = kv.validate(doc, k8s_version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            errors.append(f"{rel(path)}: {name} does not validate against Kubernetes {e.version} (strict): {where}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            errors.append(f"{rel(path)}: {name}: {e.message}")
        except kv.VersionNotSupportedError:
            sys.exit(f"check-deploy: kubernetes-validate does not support Kubernetes {k8s_version}")
        resources.append((path, doc))

# 2. kustomization.yaml lists every manifest but the examples, and only files that exist.
kpath = os.path.join(directory, "kustomization.yaml")
if not os.path.exists(kpath):
    errors.append(f"{rel(kpath)}: missing")
else:
    listed = (yaml.safe_load(open(kpath)) or {}).get("resources") or []
    for r in listed:
        if not os.path.exists(os.path.join(directory, r)):
            errors.append(f"{rel(kpath)}: lists {r}, which does not exist")
    listed_paths = {os.path.normpath(os.path.join(directory, r)) for r in listed}
    for path in files:
        if not path.endswith((".example.yaml", ".example.yml")) and os.path.normpath(path) not in listed_paths:
            errors.append(f"{rel(kpath)}: does not list {rel(path)}")

# 3. Flags, env names and envFrom keys against `picie serve --help`.
sources = {}  # (kind, name) -> set of keys
for _, doc in resources:
    if doc["kind"] in ("ConfigMap", "Secret"):
        keys = set()
        for field in ("data", "stringData", "binaryData"):
            keys |= set((doc.get(field) or {}).keys())
        sources[(doc["kind"], doc["metadata"]["name"])] = keys

def pod_spec(doc):
    spec = doc.get("spec") or {}
    kind = doc["kind"]
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    return (spec.get("template") or {}).get("spec")

used = {}  # name -> list of places
def use(name, place):
    used.setdefault(name, [])
    if place not in used[name]:
        used[name].append(place)

FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
for path, doc in resources:
    spec = pod_spec(doc) if doc["kind"] not in ("ConfigMap", "Secret") else None
    if not spec:
        continue
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        place = f"{rel(path)}: {doc['kind']}/{doc['metadata']['name']} container {c.get('name')}"
        for item in (c.get("command") or []) + (c.get("args") or []):
            for flag in FLAG.findall(str(item)):
                use(flag, place)
        for e in c.get("env") or []:
            use(e["name"], place)
            ref = e.get("valueFrom") or {}
            for kind, sel in (("ConfigMap", ref.get("configMapKeyRef")), ("Secret", ref.get("secretKeyRef"))):
                if sel and not sel.get("optional"):
                    if (kind, sel["name"]) not in sources:
                        errors.append(f"{place}: env {e['name']} refers to {kind} {sel['name']}, not defined in {rel(directory)}")
                    elif sel["key"] not in sources[(kind, sel["name"])]:
                        errors.append(f"{place}: env {e['name']} refers to key {sel['key']} missing from {kind} {sel['name']}")
        for ef in c.get("envFrom") or []:
            for kind, ref in (("ConfigMap", ef.get("configMapRef")), ("Secret", ef.get("secretRef"))):
                if not ref:
                    continue
                if (kind, ref["name"]) not in sources:
                    errors.append(f"{place}: envFrom refers to {kind} {ref['name']}, not defined in {rel(directory)}")
                    continue
                for key in sorted(sources[(kind, ref["name"])]):
                    use(ef.get("prefix", "") + key, f"{place} (envFrom {kind} {ref['name']})")

unknown = []
for name in sorted(used):
    if name.startswith("--"):
        pattern = r"(?<![\w-])" + re.escape(name) + r"(?![\w-])"
    else:
        pattern = r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])"
    if not re.search(pattern, help_text):
        unknown.append(name)
        errors.append(f"not in `picie serve --help`: {name}  ({'; '.join(used[name])})")

if errors:
    for e in errors:
        print(f"check-deploy: {e}", file=sys.stderr)
    if unknown:
        print(f"check-deploy: FAILED: {len(unknown)} name(s) unknown to `picie serve --help`: {' '.join(unknown)}", file=sys.stderr)
    print(f"check-deploy: FAILED with {len(errors)} error(s)", file=sys.stderr)
    sys.exit(1)
flags = sum(1 for n in used if n.startswith("--"))
print(f"check-deploy: ok: {len(resources)} resources in {len(files)} files valid against Kubernetes "
      f"{validated} (strict, kubernetes-validate {kv.__version__}); {flags} flags and {len(used) - flags} "
      f"env names all in `picie serve --help`")
PY
