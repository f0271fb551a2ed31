"""Pure translation of API requests into the ``values``/``written`` of a change.

Each function takes the current twin (or ``None``) and the request and returns a
:class:`Edit` for :func:`twin_service.twin.document.apply_change`.
"""

from __future__ import annotations

from dataclasses import dataclass

from twin_service.errors import BadRequest, NotFound
from twin_service.twin.document import READ_ONLY, SECTIONS, WRITABLE, Twin, Written
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.metadata import written_paths
from twin_service.twin.patch import (
    apply_json_patch,
    check_pointer_depth,
    get_at,
    merge_patch,
    remove_at,
    set_at,
    split_pointer,
)
from twin_service.types import JSON, JSONObject


@dataclass(frozen=True)
class Edit:
    values: JSONObject
    written: Written


def replace_twin(body: JSON, twin_id: str) -> Edit:
    """PUT of the whole twin: writable fields from ``body``, the rest reset to empty.

    Read-only fields are accepted (so a GET result can be PUT back) but ignored, except
    a ``twinId`` that names another twin.
    """
    if not isinstance(body, dict):
        raise BadRequest("A twin must be a JSON object.", code="twin.invalid")
    if "twinId" in body and body["twinId"] != twin_id:
        raise BadRequest(
            f"Body twinId {body['twinId']!r} does not match the URL's {twin_id!r}.",
            code="twin.invalid",
        )
    _refuse_unknown(body)
    values: JSONObject = {name: body.get(name, {}) for name in SECTIONS}
    values["definition"] = body.get("definition")
    return Edit(values=values, written=dict.fromkeys(SECTIONS))


def merge_patch_twin(twin: Twin, patch: JSON) -> Edit:
    """RFC 7396 merge patch over the writable view of the twin."""
    if not isinstance(patch, dict):
        raise BadRequest("A merge patch of a twin must be a JSON object.", code="patch.invalid")
    _refuse_read_only(patch)
    patched = merge_patch(twin.writable(), patch)
    values = {name: patched.get(name, {}) for name in patch if name in SECTIONS}
    if "definition" in patch:
        values["definition"] = patched.get("definition")
    written: Written = {
        name: written_paths(patch[name]) if isinstance(patch[name], dict) else None
        for name in patch
        if name in SECTIONS
    }
    return Edit(values=values, written=written)


def json_patch_twin(twin: Twin, operations: JSON, limits: Limits) -> Edit:
    """RFC 6902 JSON Patch over the writable view of the twin; the size limit holds after
    every operation (see :func:`apply_json_patch`)."""
    patched = apply_json_patch(twin.writable(), operations, limits)
    if not isinstance(patched, dict):
        raise BadRequest("A JSON Patch must leave the twin an object.", code="patch.invalid")
    _refuse_read_only(patched)
    values: JSONObject = {name: patched.get(name, {}) for name in SECTIONS}
    values["definition"] = patched.get("definition")
    assert isinstance(operations, list)  # apply_json_patch refuses anything else
    return Edit(values=values, written=_json_patch_written(operations, values))


#: The JSON Patch operations that write a value at their ``path`` (``remove`` writes none).
_WRITING_OPS = frozenset({"add", "replace", "copy", "move"})


def _json_patch_written(operations: list[JSONObject], sections: JSONObject) -> Written:
    """Per section, the paths the operations wrote: the ``path`` of each add, replace, copy
    and move, cut where it enters an array (an array is one leaf). Every leaf under such a
    path is stamped, as under a merge patch's written paths, the same value included.

    ``sections`` is the patched result: the operations were valid, so their paths parse.
    """
    written: Written = {name: set() for name in SECTIONS}
    for op in operations:
        if op["op"] not in _WRITING_OPS:
            continue
        parts = split_pointer(op["path"])
        if not parts:
            return dict.fromkeys(SECTIONS)
        name, rest = parts[0], parts[1:]
        if name not in SECTIONS:  # the definition is not stamped
            continue
        paths = written[name]
        if paths is None:
            continue
        if not rest:
            written[name] = None
            continue
        paths.add(_leaf_path(sections[name], rest))
    return written


def _leaf_path(section: JSON, parts: list[str]) -> tuple[str, ...]:
    """``parts`` up to the first array on the way (a later operation may have removed the
    rest: then the path is kept, and stamps nothing)."""
    node = section
    path: list[str] = []
    for part in parts:
        if isinstance(node, list):
            break
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return tuple(path)


def put_at(twin: Twin | None, section: str, parts: list[str], value: JSON) -> Edit:
    """PUT a value at a pointer inside a section (missing parent objects are created)."""
    current = twin.section(section) if twin else ({} if section != "definition" else None)
    new = set_at(current, parts, value)
    return Edit(values={section: new}, written={section: {tuple(parts)} if parts else None})


def patch_at(twin: Twin, section: str, parts: list[str], patch: JSON) -> Edit:
    """Merge-patch the value at a pointer inside a section.

    A ``null`` patch deletes the value there (nothing to delete is no change), as the same
    null one level up in a merge patch would: a twin section never holds a null.
    """
    # Before the lookup: a null with nothing to delete would otherwise pass unchecked.
    check_pointer_depth(parts)
    current = twin.section(section)
    try:
        target = get_at(current, parts)
    except NotFound:
        target = None
        if patch is None:
            return Edit(values={section: current}, written={section: {tuple(parts)}})
    if patch is None and parts:
        new = remove_at(current, parts)
    else:
        new = (
            set_at(current, parts, merge_patch(target, patch))
            if parts
            else merge_patch(target, patch)
        )
    written = {tuple(parts) + p for p in written_paths(patch)}
    return Edit(values={section: new}, written={section: written})


def delete_at(twin: Twin, section: str, parts: list[str]) -> Edit:
    """DELETE the value at a pointer (the whole section becomes ``{}`` for an empty pointer).

    A pointer past the depth limit is a write's 400, not the 404 of a value not there.
    """
    check_pointer_depth(parts)
    if section == "definition":
        return Edit(values={"definition": None}, written={})
    current = twin.section(section)
    new = remove_at(current, parts) if parts else {}
    return Edit(values={section: new}, written={section: {tuple(parts)}})


def _refuse_unknown(doc: JSONObject) -> None:
    unknown = set(doc) - set(WRITABLE) - set(READ_ONLY)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.", code="twin.invalid")


def _refuse_read_only(doc: JSONObject) -> None:
    # A name the twin does not have is invalid, as in a PUT: twin.readonly is for the
    # fields the service maintains (docs/errors.md).
    _refuse_unknown(doc)
    bad = sorted(set(doc) - set(WRITABLE))
    if bad:
        raise BadRequest(
            f"Field(s) {', '.join(bad)} cannot be written.",
            code="twin.readonly",
            description=f"Writable fields are: {', '.join(WRITABLE)}.",
        )
