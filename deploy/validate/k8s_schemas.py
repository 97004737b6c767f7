"""Lay out Kubernetes and CRD JSON schemas where kubeconform finds them, offline.

k8s SRC DEST VERSION...
    SRC is the kubernetes-json-schema folder of the kubernetes-validate package (PyPI),
    which holds the schemas generated from each release's OpenAPI document, in
    "v<version>-local-strict" folders whose references point at "/api/_definitions.json"
    under an https "$id". kubeconform compiles each schema from its file, so this writes
    DEST/v<version>-standalone-strict/<kind>-<group>-<version>.json (kubeconform's own
    layout) with the "$id" dropped and the references made relative to the sibling
    _definitions.json.

crd DEST CRD.yaml...
    Converts each CustomResourceDefinition's openAPIV3Schema with kubeconform's own
    scripts/openapi2jsonschema.py rules (strict: additionalProperties false everywhere,
    int-or-string as oneOf) to DEST/<group>/<kind>_<version>.json, adding the apiVersion
    and kind each resource must carry.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REF = '"/api/_definitions.json#'


def k8s(src: Path, dest: Path, versions: list[str]) -> None:
    for version in versions:
        folder = src / f"v{version}-local-strict"
        if not folder.is_dir():
            sys.exit(f"k8s_schemas: no schemas for Kubernetes {version} in {src}")
        out = dest / f"v{version}-standalone-strict"
        out.mkdir(parents=True, exist_ok=True)
        count = 0
        for file in sorted(folder.glob("*.json")):
            schema = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(schema, dict):
                schema.pop("$id", None)
            text = json.dumps(schema).replace(REF, '"_definitions.json#')
            (out / file.name).write_text(text, encoding="utf-8")
            count += 1
        print(f"k8s_schemas: {count} schemas of Kubernetes {version} in {out}")


def _strict(node):
    """additionalProperties: false where properties are listed; int-or-string as oneOf."""
    if isinstance(node, dict):
        if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
            rest = {k: v for k, v in node.items() if k not in ("type", "format", "x-kubernetes-int-or-string", "anyOf")}
            return {**rest, "oneOf": [{"type": "string"}, {"type": "integer"}]}
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def crd(dest: Path, files: list[Path]) -> None:
    import yaml

    for file in files:
        for doc in yaml.safe_load_all(file.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for version in spec["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                props = schema.setdefault("properties", {})
                props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
                props["kind"] = {"type": "string", "enum": [kind]}
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
                out = dest / group / f"{kind.lower()}_{version['name']}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(schema, indent=1), encoding="utf-8")
                print(f"k8s_schemas: {group}/{version['name']} {kind} -> {out}")


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "k8s":
        k8s(Path(args[0]), Path(args[1]), args[2:])
    elif mode == "crd":
        crd(Path(args[0]), [Path(a) for a in args[1:]])
    else:
        sys.exit(f"usage: {sys.argv[0]} k8s SRC DEST VERSION... | crd DEST CRD.yaml...")
