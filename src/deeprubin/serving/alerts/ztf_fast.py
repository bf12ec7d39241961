"""A compiled reader of the few fields of a ZTF alert that the consumer uses (issue 18).

fastavro builds a Python dict for every field of every record: a ZTF alert's candidate and up to 30 days of
``prv_candidates`` are thousands of fields, ~74 us an alert, of which the consumer uses six per detection. This
module turns an OCF's embedded writer schema, once per distinct schema, into a small program (:func:`compile_ztf`)
that a numba function runs over the packet's bytes (:func:`_run`): it skips what is not used without building it
and reads ``objectId``, ``candid`` and, of the candidate and of each previous candidate, ``jd``, ``fid``,
``magpsf``, ``sigmapsf``, ``isdiffpos`` (and the candidate's ``candid``).

It answers exactly what ``fastavro`` + :func:`deeprubin.serving.alerts.packets.ztf_alert` answer, or declines
(None): a schema it does not compile (no such fields, recursive types, a field of another type), a codec other
than null and deflate, bytes that do not parse, a string that is not ASCII where the answer depends on it.
The caller then takes the fastavro path, so errors and messages stay fastavro's own. Tests compare the two paths.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numba
import numpy as np

from deeprubin.schema import ISDIFFPOS_NEGATIVE


# Opcodes of a compiled program: rows of ops (opcode, a, b); a block ends with END.
END, SKIP_VARINT, SKIP_FLOAT, SKIP_DOUBLE, SKIP_BYTES, SKIP_FIXED, UNION, ARRAY, READ_LONG, READ_FLOAT, \
    READ_DOUBLE, READ_STR, NOP = range(13)

# Scalar slots (b = 0) and row slots (b = 1) of READ ops.
S_OBJECT_ID, S_CANDID, S_JD, S_FID, S_MAG, S_MAGERR, S_DIFFPOS, S_CAND_CANDID = range(8)
R_JD, R_FID, R_MAG, R_MAGERR, R_DIFFPOS = range(5)
N_SCALARS, N_ROW_SLOTS = 8, 5
MAX_DEPTH = 64  # nested unions and arrays the interpreter follows

# Outcomes of _run.
OK, BAD, MORE_ROWS = 0, 1, 2


class NotCompiled(Exception):
    """The schema has a shape this reader does not handle: the fastavro path reads it."""


_PRIMITIVE_SKIPS = {"null": NOP, "boolean": SKIP_VARINT, "int": SKIP_VARINT, "long": SKIP_VARINT,
                    "float": SKIP_FLOAT, "double": SKIP_DOUBLE, "bytes": SKIP_BYTES, "string": SKIP_BYTES}
_READS = {"int": READ_LONG, "long": READ_LONG, "float": READ_FLOAT, "double": READ_DOUBLE, "string": READ_STR}

# What is read, by record: field name -> (scalar or row slot, allowed Avro types).
_NUMERIC = ("double", "float")
_CANDIDATE_READS = {"jd": (S_JD, _NUMERIC), "fid": (S_FID, ("int", "long")), "magpsf": (S_MAG, _NUMERIC),
                    "sigmapsf": (S_MAGERR, _NUMERIC), "isdiffpos": (S_DIFFPOS, ("string",)),
                    "candid": (S_CAND_CANDID, ("int", "long"))}
_PRV_READS = {"jd": (R_JD, _NUMERIC), "fid": (R_FID, ("int", "long")), "magpsf": (R_MAG, _NUMERIC),
              "sigmapsf": (R_MAGERR, _NUMERIC), "isdiffpos": (R_DIFFPOS, ("string",))}


@dataclass(frozen=True)
class Program:
    ops: np.ndarray  # (n, 3) int64
    unions: np.ndarray  # (n_unions, 1 + max branches) int64: branch count, then each branch's block start
    has_top_candid: bool  # the alert record has its own candid (else the candidate's is the alert id)


class _Compiler:
    def __init__(self):
        self.blocks: list[list[tuple[int, int, int]]] = []
        self.unions: list[list[int]] = []  # branch block ids, resolved to pcs at the end
        self.named: dict[str, Any] = {}
        self.expanding: set[str] = set()

    def new_block(self) -> int:
        self.blocks.append([])
        return len(self.blocks) - 1

    def resolve(self, t: Any, namespace: str) -> tuple[Any, str]:
        """A type reference -> its definition; named definitions are registered on first sight."""
        if isinstance(t, str):
            if t in _PRIMITIVE_SKIPS:
                return t, namespace
            full = t if "." in t else (f"{namespace}.{t}" if namespace else t)
            found = self.named.get(full, self.named.get(t))
            if found is None:
                raise NotCompiled(f"unknown type {t!r}")
            return found
        if isinstance(t, dict):
            if t.get("type") in _PRIMITIVE_SKIPS and "logicalType" not in t:
                return t["type"], namespace
            if t.get("type") in ("record", "error", "enum", "fixed"):
                name = t.get("name")
                if not isinstance(name, str):
                    raise NotCompiled("a named type without a name")
                ns = t.get("namespace", namespace if "." not in name else name.rsplit(".", 1)[0])
                full = name if "." in name else (f"{ns}.{name}" if ns else name)
                self.named.setdefault(full, (t, ns))
                return t, ns
        return t, namespace

    def emit(self, block: int, t: Any, namespace: str, reads: dict | None = None, read: tuple | None = None
             ) -> None:
        """Ops for one value of type ``t`` appended to ``block``. ``read`` = (slot, row?, allowed types) reads
        the value (through a union with null); ``reads`` = {field: (slot, allowed)} for a record's fields."""
        t, ns = self.resolve(t, namespace)
        ops = self.blocks[block]
        if isinstance(t, str):
            if read is not None:
                slot, row, allowed = read
                if t == "null":
                    ops.append((NOP, 0, 0))
                    return
                if t not in allowed:
                    raise NotCompiled(f"a read field of type {t}")
                ops.append((_READS[t], slot, row))
                return
            ops.append((_PRIMITIVE_SKIPS[t], 0, 0))
            return
        if isinstance(t, list):  # a union: a block per branch
            branches = []
            for branch in t:
                b = self.new_block()
                self.emit(b, branch, ns, reads, read)
                self.blocks[b].append((END, 0, 0))
                branches.append(b)
            self.unions.append(branches)
            ops.append((UNION, len(self.unions) - 1, 0))
            return
        if not isinstance(t, dict):
            raise NotCompiled(f"bad type {t!r}")
        kind = t.get("type")
        if read is not None:  # fastavro would convert a logical type, or build a record
            raise NotCompiled(f"a read field of type {kind} ({t.get('logicalType')})")
        if kind in _PRIMITIVE_SKIPS:  # with a logical type: skipped as its primitive
            ops.append((_PRIMITIVE_SKIPS[kind], 0, 0))
        elif kind in ("record", "error"):
            key = json.dumps(t, sort_keys=True)
            if key in self.expanding:
                raise NotCompiled("a recursive record")
            self.expanding.add(key)
            for field in t.get("fields", []):
                name = field.get("name")
                spec = (reads or {}).get(name)
                self.emit(block, field["type"], ns, None, None if spec is None else (spec[0], 0, spec[1]))
            self.expanding.discard(key)
        elif kind == "enum":
            ops.append((SKIP_VARINT, 0, 0))
        elif kind == "fixed":
            ops.append((SKIP_FIXED, int(t["size"]), 0))
        elif kind == "array":
            item = self.new_block()
            self.emit(item, t["items"], ns)
            self.blocks[item].append((END, 0, 0))
            ops.append((ARRAY, item, 0))
        elif kind == "map":
            item = self.new_block()
            self.blocks[item].append((SKIP_BYTES, 0, 0))
            self.emit(item, t["values"], ns)
            self.blocks[item].append((END, 0, 0))
            ops.append((ARRAY, item, 0))
        else:
            raise NotCompiled(f"type {kind!r}")

    def emit_prv(self, block: int, t: Any, namespace: str) -> None:
        """``prv_candidates``: null, or an array of records whose fields are read into rows."""
        t, ns = self.resolve(t, namespace)
        options = t if isinstance(t, list) else [t]
        arrays = 0
        branches = []
        for option in options:
            o, ons = self.resolve(option, ns)
            b = self.new_block()
            if o == "null":
                self.blocks[b].append((NOP, 0, 0))
            elif isinstance(o, dict) and o.get("type") == "array":
                rec, rns = self.resolve(o["items"], ons)
                if not (isinstance(rec, dict) and rec.get("type") == "record"):
                    raise NotCompiled("prv_candidates items are not records")
                names = {f.get("name") for f in rec.get("fields", [])}
                if not {"jd", "fid", "magpsf", "sigmapsf"} <= names:
                    raise NotCompiled("prv_candidates records lack jd, fid, magpsf or sigmapsf")
                arrays += 1
                item = self.new_block()
                for field in rec["fields"]:
                    spec = _PRV_READS.get(field.get("name"))
                    self.emit(item, field["type"], rns, None, None if spec is None else (spec[0], 1, spec[1]))
                self.blocks[item].append((END, 0, 0))
                self.blocks[b].append((ARRAY, item, 1))
            else:
                raise NotCompiled("prv_candidates is neither null nor an array")
            self.blocks[b].append((END, 0, 0))
            branches.append(b)
        if arrays == 0:
            raise NotCompiled("prv_candidates is never an array")
        if isinstance(t, list):
            self.unions.append(branches)
            self.blocks[block].append((UNION, len(self.unions) - 1, 0))
        else:  # a bare array: inline its branch block (without its END)
            self.blocks[block].extend(self.blocks[branches[0]][:-1])

    def link(self) -> tuple[np.ndarray, np.ndarray]:
        starts, pc = [], 0
        for ops in self.blocks:
            starts.append(pc)
            pc += len(ops)
        flat = []
        for ops in self.blocks:
            for op, a, b in ops:
                flat.append((op, starts[a] if op == ARRAY else a, b))
        width = 1 + max((len(u) for u in self.unions), default=0)
        unions = np.zeros((max(len(self.unions), 1), width), dtype=np.int64)
        for i, branches in enumerate(self.unions):
            unions[i, 0] = len(branches)
            unions[i, 1:1 + len(branches)] = [starts[b] for b in branches]
        return np.array(flat, dtype=np.int64).reshape(-1, 3), unions


def compile_ztf(schema: Any) -> Program:
    """The program reading a ZTF alert record of writer schema ``schema`` (parsed JSON). Raises NotCompiled."""
    c = _Compiler()
    top, ns = c.resolve(schema, "")
    if not (isinstance(top, dict) and top.get("type") == "record"):
        raise NotCompiled("not a record")
    fields = {f.get("name"): f for f in top.get("fields", [])}
    if "objectId" not in fields or "candidate" not in fields or "prv_candidates" not in fields:
        raise NotCompiled("not a ZTF alert schema")
    cand, cns = c.resolve(fields["candidate"]["type"], ns)
    if not (isinstance(cand, dict) and cand.get("type") == "record"):
        raise NotCompiled("candidate is not a record")
    if not {"jd", "fid", "magpsf", "sigmapsf"} <= {f.get("name") for f in cand.get("fields", [])}:
        raise NotCompiled("candidate lacks jd, fid, magpsf or sigmapsf")
    main = c.new_block()
    for field in top["fields"]:
        name, t = field.get("name"), field["type"]
        if name == "objectId":
            c.emit(main, t, ns, None, (S_OBJECT_ID, 0, ("string",)))
        elif name == "candid":
            c.emit(main, t, ns, None, (S_CANDID, 0, ("int", "long")))
        elif name == "candidate":
            c.emit(main, t, ns, _CANDIDATE_READS)
        elif name == "prv_candidates":
            c.emit_prv(main, t, ns)
        else:
            c.emit(main, t, ns)
    c.blocks[main].append((END, 0, 0))
    ops, unions = c.link()
    return Program(ops, unions, "candid" in fields)


# ----------------------------------------------------------------------------------------------------------------
# The interpreter.

@numba.njit(cache=True, nogil=True)
def _varint(buf, pos, end):
    """(zig-zag decoded value, next position), or (0, -1) past ``end`` or over 10 bytes."""
    n = np.int64(0)
    shift = 0
    while True:
        if pos >= end or shift > 63:
            return np.int64(0), -1
        b = np.int64(buf[pos])
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    return (n >> 1) ^ -(n & 1), pos


@numba.njit(cache=True, nogil=True)
def _block_count(buf, pos, end):
    """(items in an array or map block, next position): a negative count is followed by the block's size in bytes."""
    count, pos = _varint(buf, pos, end)
    if pos >= 0 and count < 0:
        count = -count
        _, pos = _varint(buf, pos, end)
    return count, pos


@numba.njit(cache=True, nogil=True)
def _run(buf, pos, end, ops, unions, scal_i, scal_f, scal_set, rows_i, rows_f, rows_set):
    """Run a program over one record at ``buf[pos:end]``. Returns (outcome, next position, rows used).

    Scalars: ints (and string offset, length) in scal_i[slot, 0:2], floats in scal_f[slot], scal_set[slot] = 1
    when read. Rows likewise, one per array item of the array marked for rows."""
    stack_kind = np.zeros(MAX_DEPTH, np.int64)  # 0: a union branch, 1: an array
    stack_ret = np.zeros(MAX_DEPTH, np.int64)
    stack_left = np.zeros(MAX_DEPTH, np.int64)
    stack_item = np.zeros(MAX_DEPTH, np.int64)
    stack_rows = np.zeros(MAX_DEPTH, np.int64)
    sp = 0
    pc = 0
    row = -1
    cap = rows_f.shape[0]
    while True:
        op = ops[pc, 0]
        a = ops[pc, 1]
        b = ops[pc, 2]
        if op == END:
            if sp == 0:
                return OK, pos, row + 1
            top = sp - 1
            if stack_kind[top] == 0:
                pc = stack_ret[top]
                sp -= 1
                continue
            stack_left[top] -= 1
            if stack_left[top] == 0:
                count, pos = _block_count(buf, pos, end)
                if pos < 0:
                    return BAD, pos, row + 1
                if count == 0:
                    pc = stack_ret[top]
                    sp -= 1
                    continue
                stack_left[top] = count
            pc = stack_item[top]
            if stack_rows[top] == 1:
                row += 1
                if row >= cap:
                    return MORE_ROWS, pos, row
            continue
        if op == ARRAY:
            count, pos = _block_count(buf, pos, end)
            if pos < 0:
                return BAD, pos, row + 1
            if count == 0:
                pc += 1
                continue
            if sp >= MAX_DEPTH:
                return BAD, pos, row + 1
            stack_kind[sp] = 1
            stack_ret[sp] = pc + 1
            stack_left[sp] = count
            stack_item[sp] = a
            stack_rows[sp] = b
            sp += 1
            pc = a
            if b == 1:
                row += 1
                if row >= cap:
                    return MORE_ROWS, pos, row
            continue
        if op == UNION:
            k, pos = _varint(buf, pos, end)
            if pos < 0 or k < 0 or k >= unions[a, 0] or sp >= MAX_DEPTH:
                return BAD, pos, row + 1
            stack_kind[sp] = 0
            stack_ret[sp] = pc + 1
            sp += 1
            pc = unions[a, 1 + k]
            continue
        pc += 1
        if op == NOP:
            continue
        if op == SKIP_VARINT:
            _, pos = _varint(buf, pos, end)
            if pos < 0:
                return BAD, pos, row + 1
        elif op == SKIP_FLOAT:
            pos += 4
        elif op == SKIP_DOUBLE:
            pos += 8
        elif op == SKIP_FIXED:
            pos += a
        elif op == SKIP_BYTES:
            n, pos = _varint(buf, pos, end)
            if pos < 0 or n < 0:
                return BAD, pos, row + 1
            pos += n
        elif op == READ_LONG:
            v, pos = _varint(buf, pos, end)
            if pos < 0:
                return BAD, pos, row + 1
            if b == 0:
                scal_i[a, 0] = v
                scal_set[a] = 1
            else:
                rows_i[row, a, 0] = v
                rows_set[row, a] = 1
        elif op == READ_FLOAT or op == READ_DOUBLE:
            width = 4 if op == READ_FLOAT else 8
            if pos + width > end:
                return BAD, -1, row + 1
            if op == READ_FLOAT:
                v = np.float64(buf[pos:pos + 4].view(np.float32)[0])
            else:
                v = buf[pos:pos + 8].view(np.float64)[0]
            pos += width
            if b == 0:
                scal_f[a] = v
                scal_set[a] = 1
            else:
                rows_f[row, a] = v
                rows_set[row, a] = 1
        elif op == READ_STR:
            n, pos = _varint(buf, pos, end)
            if pos < 0 or n < 0 or pos + n > end:
                return BAD, -1, row + 1
            if b == 0:
                scal_i[a, 0] = pos
                scal_i[a, 1] = n
                scal_set[a] = 1
            else:
                rows_i[row, a, 0] = pos
                rows_i[row, a, 1] = n
                rows_set[row, a] = 1
            pos += n
        else:
            return BAD, pos, row + 1
        if pos > end:
            return BAD, pos, row + 1


# isdiffpos values read as negative (deeprubin.schema.isdiffpos_sign), as padded bytes for the compiled reader
_NEGATIVE = tuple(w.encode() for w in sorted(ISDIFFPOS_NEGATIVE))
_NEGATIVE_TABLE = np.zeros((len(_NEGATIVE), max(map(len, _NEGATIVE))), np.uint8)
for _i, _word in enumerate(_NEGATIVE):
    _NEGATIVE_TABLE[_i, :len(_word)] = np.frombuffer(_word, np.uint8)
_NEGATIVE_LENGTHS = np.array([len(w) for w in _NEGATIVE], np.int64)
_WHITESPACE = np.zeros(256, np.bool_)  # str.strip()'s ASCII whitespace
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


@numba.njit(cache=True, nogil=True)
def _sign(buf, off, n, table, lengths, whitespace):
    """:func:`deeprubin.schema.isdiffpos_sign` of the string ``buf[off:off + n]``: -1.0 or 1.0; 0.0 when it is
    not ASCII (str.strip() and str.lower() know more than ASCII: the fastavro path decides)."""
    for i in range(off, off + n):
        if buf[i] >= 0x80:
            return 0.0
    lo, hi = off, off + n
    while lo < hi and whitespace[buf[lo]]:
        lo += 1
    while hi > lo and whitespace[buf[hi - 1]]:
        hi -= 1
    for w in range(table.shape[0]):
        if lengths[w] != hi - lo:
            continue
        same = True
        for j in range(hi - lo):
            c = buf[lo + j]
            if 65 <= c <= 90:
                c += 32
            if c != table[w, j]:
                same = False
                break
        if same:
            return -1.0
    return 1.0


@numba.njit(cache=True, nogil=True)
def _decode_record(buf, pos, end, ops, unions, table, lengths, whitespace):
    """One record: (outcome, next position, scalars' ints (slot, 2), which scalars were read, and the detections
    as ztf_alert reads them: the candidate, then each previous candidate with a magpsf: jd, fid (-1: null), magpsf,
    sigmapsf, isdiffpos sign). Outcome BAD also when an isdiffpos is not ASCII."""
    cap = 64
    while True:
        scal_i = np.zeros((N_SCALARS, 2), np.int64)
        scal_f = np.full(N_SCALARS, np.nan)
        scal_set = np.zeros(N_SCALARS, np.int8)
        rows_i = np.zeros((cap, N_ROW_SLOTS, 2), np.int64)
        rows_f = np.full((cap, N_ROW_SLOTS), np.nan)
        rows_set = np.zeros((cap, N_ROW_SLOTS), np.int8)
        outcome, nxt, n_rows = _run(buf, pos, end, ops, unions, scal_i, scal_f, scal_set, rows_i, rows_f, rows_set)
        if outcome != MORE_ROWS:
            break
        cap *= 4
    n = 1
    for r in range(n_rows):
        if rows_set[r, R_MAG] == 1:
            n += 1
    jd = np.empty(n)
    fid = np.empty(n, np.int64)
    mag = np.empty(n)
    mag_err = np.empty(n)
    sign = np.ones(n)
    jd[0], fid[0], mag[0], mag_err[0] = scal_f[S_JD], scal_i[S_FID, 0], scal_f[S_MAG], scal_f[S_MAGERR]
    if scal_set[S_DIFFPOS] == 1:
        sign[0] = _sign(buf, scal_i[S_DIFFPOS, 0], scal_i[S_DIFFPOS, 1], table, lengths, whitespace)
    k = 1
    for r in range(n_rows):
        if rows_set[r, R_MAG] != 1:
            continue
        jd[k], mag[k], mag_err[k] = rows_f[r, R_JD], rows_f[r, R_MAG], rows_f[r, R_MAGERR]
        fid[k] = rows_i[r, R_FID, 0] if rows_set[r, R_FID] == 1 else -1
        if rows_set[r, R_DIFFPOS] == 1:
            sign[k] = _sign(buf, rows_i[r, R_DIFFPOS, 0], rows_i[r, R_DIFFPOS, 1], table, lengths, whitespace)
        k += 1
    if outcome == OK:
        for i in range(n):
            if sign[i] == 0.0:
                outcome = BAD
    return outcome, nxt, scal_i, scal_set, jd, fid, mag, mag_err, sign


@dataclass
class Decoded:
    """One record's fields as ``ztf_alert`` reads them: the candidate first, then the previous detections (a null
    ``magpsf`` is a non-detection and is left out); or ``error``, the PacketError message ztf_alert raises before
    it reaches the points. ``record_candid`` and ``record_oid`` are the record's own ``candid`` and ``objectId``
    (what a Malformed entry names; ``record_oid`` is also the alert's object)."""

    record_candid: str | None
    record_oid: str | None
    error: str | None = None
    alert_id: str = ""
    jd: np.ndarray | None = None
    fid: np.ndarray | None = None
    mag: np.ndarray | None = None
    mag_err: np.ndarray | None = None
    sign: np.ndarray | None = None


class Declined(Exception):
    """This reader cannot answer for this packet: use the fastavro path."""


def _record(buf: np.ndarray, data: bytes, pos: int, end: int, program: Program) -> tuple[Decoded, int]:
    outcome, nxt, scal_i, scal_set, jd, fid, mag, mag_err, sign = _decode_record(
        buf, pos, end, program.ops, program.unions, _NEGATIVE_TABLE, _NEGATIVE_LENGTHS, _WHITESPACE)
    if outcome != OK or nxt > end:
        raise Declined("bytes do not parse, or an isdiffpos is not ASCII")
    if scal_set[S_OBJECT_ID]:
        off, n = scal_i[S_OBJECT_ID]
        try:
            oid = data[off:off + n].decode()
        except UnicodeDecodeError as exc:
            raise Declined("objectId is not UTF-8") from exc
    else:
        oid = None
    record_candid = str(scal_i[S_CANDID, 0]) if program.has_top_candid and scal_set[S_CANDID] else None
    if not oid:
        return Decoded(record_candid, oid, "ZTF alert without objectId"), nxt
    candid_slot = S_CANDID if program.has_top_candid else S_CAND_CANDID
    if not scal_set[candid_slot]:
        return Decoded(record_candid, oid, f"ZTF alert of {oid} without candid"), nxt
    alert_id = str(scal_i[candid_slot, 0])
    for name, slot in (("jd", S_JD), ("fid", S_FID), ("magpsf", S_MAG), ("sigmapsf", S_MAGERR)):
        if not scal_set[slot]:
            return Decoded(record_candid, oid, f"ZTF alert {alert_id} of {oid}: candidate.{name} is null"), nxt
    return Decoded(record_candid, oid, None, alert_id, jd, fid, mag, mag_err, sign), nxt


_OCF_MAGIC = b"Obj\x01"


@lru_cache(maxsize=64)
def _program(raw_schema: bytes) -> Program | None:
    """The compiled program of an embedded schema, once per distinct schema; None when it does not compile."""
    try:
        return compile_ztf(json.loads(raw_schema))
    except (NotCompiled, ValueError, KeyError, TypeError, AttributeError):
        return None


@numba.njit(cache=True, nogil=True)
def _header(buf, schema_key, codec_key):
    """An OCF header (magic, a map of bytes, 16 sync bytes) -> (position after it, schema value's offset and
    length, codec value's offset and length (-1: none)); position -1 when it does not parse."""
    end = len(buf)
    pos = 4
    schema_off, schema_len, codec_off, codec_len = -1, -1, -1, -1
    while True:
        count, pos = _varint(buf, pos, end)
        if pos < 0:
            return -1, 0, 0, 0, 0
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _varint(buf, pos, end)
            if pos < 0:
                return -1, 0, 0, 0, 0
        for _ in range(count):
            n, pos = _varint(buf, pos, end)
            if pos < 0 or n < 0 or pos + n > end:
                return -1, 0, 0, 0, 0
            key_off, key_len = pos, n
            pos += n
            n, pos = _varint(buf, pos, end)
            if pos < 0 or n < 0 or pos + n > end:
                return -1, 0, 0, 0, 0
            if _equal(buf, key_off, key_len, schema_key):
                schema_off, schema_len = pos, n
            elif _equal(buf, key_off, key_len, codec_key):
                codec_off, codec_len = pos, n
            pos += n
    if pos + 16 > end:
        return -1, 0, 0, 0, 0
    return pos + 16, schema_off, schema_len, codec_off, codec_len


@numba.njit(cache=True, nogil=True)
def _equal(buf, off, n, word):
    if n != len(word):
        return False
    for i in range(n):
        if buf[off + i] != word[i]:
            return False
    return True


_SCHEMA_KEY = np.frombuffer(b"avro.schema", np.uint8)
_CODEC_KEY = np.frombuffer(b"avro.codec", np.uint8)
# [(the last embedded schema, its program)]: a stream repeats one schema; one tuple, swapped whole (threads)
_last_schema: list[tuple[bytes, Program | None]] = [(b"", None)]


def decode_ocf(data: bytes) -> list[Decoded] | None:
    """The ZTF alert records of an Avro object container file, or None when this reader declines the packet
    (the fastavro path then reads it: its results and messages are the reference)."""
    if data[:4] != _OCF_MAGIC:
        return None
    try:
        buf = np.frombuffer(data, np.uint8)
        pos, schema_off, schema_len, codec_off, codec_len = _header(buf, _SCHEMA_KEY, _CODEC_KEY)
        if pos < 0 or schema_off < 0:
            return None
        codec = b"null" if codec_off < 0 else data[codec_off:codec_off + codec_len]
        if codec not in (b"null", b"deflate"):
            return None
        sync = data[pos - 16:pos]
        raw = data[schema_off:schema_off + schema_len]
        last_raw, program = _last_schema[0]
        if raw != last_raw:  # a compare, not a hash of the whole schema
            program = _program(raw)
            _last_schema[0] = (raw, program)
        if program is None:
            return None
        out: list[Decoded] = []
        end = len(data)
        while pos < end:
            count, pos = _varint(buf, pos, end)
            if pos < 0 or count < 0:
                return None
            size, pos = _varint(buf, pos, end)
            if pos < 0 or size < 0 or pos + size + 16 > end:
                return None
            if codec == b"null":
                block, bbuf, bpos, bend = data, buf, pos, pos + size
            else:
                block = zlib.decompress(data[pos:pos + size], -15)
                bbuf, bpos, bend = np.frombuffer(block, np.uint8), 0, len(block)
            for _ in range(count):
                decoded, bpos = _record(bbuf, block, bpos, bend, program)
                out.append(decoded)
            if bpos != bend or data[pos + size:pos + size + 16] != sync:
                return None
            pos += size + 16
        return out
    except (Declined, zlib.error):
        return None
