"""``leantune data check|stats`` on preference files (TRL's prompt / chosen / rejected shapes).

    check   every malformed record (a missing side, a wrong type, an empty side, a bad
            conversation), pairs whose chosen and rejected are identical (they teach nothing),
            and with --tokenizer / --max-len prompts that leave no room in max_len (dropped in
            training); sides cut at max_len are warnings
    stats   counts, shape, lengths of prompt / chosen / rejected, identical pairs, and the
            length bias: mean chosen minus rejected length (a large one lets a model prefer by
            length alone)

``train.curation.cmd_data`` hands a file whose first record is a preference pair to
``PAIR_ACTIONS``.
"""
from __future__ import annotations

import json

from leantune.base import DataError
from leantune.train.data import _lines, _open, parse_line
from leantune.train.preference import check_pair, encode_texts, is_preference_record

SIDE_NAMES = ("prompt", "chosen", "rejected")


def is_preference_file(path) -> bool:
    """Whether the first non-blank line of ``path`` is a preference record (False when it is
    unreadable: the ordinary checks then say why)."""
    try:
        with _open(path, str(path)) as f:
            for line_no, raw in _lines(f, str(path)):
                if raw.strip():
                    return is_preference_record(parse_line(raw, f"{path}:{line_no}"))
    except DataError:
        return False
    return False


def side_chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(m.get("content", "")) for m in value if isinstance(m, dict))


def scan_pairs(path, tok=None, max_len=None, on_invalid=None) -> dict:
    """One pass over a preference file: problems and warnings ("FILE:LINE: what"), lengths in
    characters (and tokens with ``tok``) of each side, identical pairs."""
    name = str(path)
    rep = {"path": name, "records": 0, "shape": None, "problems": [], "warnings": [], "identical": 0,
           "chars": {s: [] for s in SIDE_NAMES}, "tokens": {s: [] for s in SIDE_NAMES}}
    with _open(path, name) as f:
        for line_no, raw in _lines(f, name):
            if not raw.strip():
                continue
            where = f"{name}:{line_no}"
            try:
                record = parse_line(raw, where)
                shape = check_pair(record, where)
                _scan_record(rep, record, shape, where, tok, max_len)
            except DataError as e:
                if on_invalid is not None:
                    on_invalid(line_no, raw, e)
                else:
                    rep["problems"].append(str(e))
    if rep["records"] == 0 and not rep["problems"]:
        rep["problems"].append(f"{name}: no records (the file is empty)")
    return rep


def _scan_record(rep, record, shape, where, tok, max_len):
    rep["records"] += 1
    rep["shape"] = rep["shape"] or shape
    for side in SIDE_NAMES:
        rep["chars"][side].append(side_chars(record[side]))
    if json.dumps(record["chosen"], sort_keys=True) == json.dumps(record["rejected"], sort_keys=True):
        rep["identical"] += 1
        rep["problems"].append(f"{where}: chosen and rejected are identical (the pair teaches nothing)")
    if tok is None:
        return
    ids = encode_texts(record, tok, shape, where)
    for side, seq in zip(SIDE_NAMES, ids):
        rep["tokens"][side].append(len(seq))
    if max_len is not None:
        prompt, longest = len(ids[0]), max(len(ids[1]), len(ids[2]))
        if prompt >= max_len:
            rep["problems"].append(f"{where}: the prompt has {prompt:,} tokens and leaves no room in "
                                   f"max_len={max_len}; the pair would be dropped")
        elif prompt + longest > max_len:
            rep["warnings"].append(f"{where}: prompt + the longer side is {prompt + longest:,} tokens > "
                                   f"max_len={max_len} (cut)")


def length_bias(lengths: dict) -> float | None:
    """Mean chosen minus rejected length."""
    c, r = lengths["chosen"], lengths["rejected"]
    return (sum(c) - sum(r)) / len(c) if c else None


def pair_stats(rep: dict) -> dict:
    from leantune.train.curation import percentiles

    out = {"path": rep["path"], "records": rep["records"], "format": f"preference ({rep['shape']})",
           "identical_pairs": rep["identical"]}
    for unit in ("chars", "tokens"):
        if rep[unit]["prompt"]:
            out[f"length_{unit}"] = {s: percentiles(rep[unit][s]) for s in SIDE_NAMES}
            out[f"length_bias_{unit}"] = length_bias(rep[unit])
    return out


def stats_lines(st: dict) -> list[str]:
    from leantune.train.curation import _fmt_pct

    lines = [f"{st['path']}: {st['records']:,} records, format {st['format']}"]
    for unit in ("chars", "tokens"):
        if f"length_{unit}" in st:
            for side in SIDE_NAMES:
                lines.append(f"{side} ({unit}): {_fmt_pct(st[f'length_{unit}'][side])}")
            lines.append(f"length bias ({unit}): mean chosen - rejected = {st[f'length_bias_{unit}']:+,.1f}")
    lines.append(f"identical chosen and rejected: {st['identical_pairs']:,}")
    return lines


def _tokenizer(args):
    from leantune.train.curation import _load_tokenizer

    return _load_tokenizer(args.tokenizer) if getattr(args, "tokenizer", None) else None


def data_check(args, say, on_invalid):
    rep = scan_pairs(args.file, _tokenizer(args), getattr(args, "max_len", None), on_invalid)
    say(f"checked {rep['path']}: {rep['records']:,} records (preference, {rep['shape'] or '?'}), "
        f"{len(rep['problems'])} problem(s)")
    for line in rep["problems"]:
        say(line)
    if rep["warnings"]:
        say(f"warning: {len(rep['warnings']):,} pairs longer than max_len (cut)")
        for line in rep["warnings"][:20]:
            say(f"  {line}")
    for line in stats_lines(pair_stats(rep))[1:]:
        say(line)
    if rep["problems"]:
        raise DataError(args.file, f"{len(rep['problems'])} problem(s) found (listed above)")


def data_stats(args, say, on_invalid):
    rep = scan_pairs(args.file, _tokenizer(args), None, on_invalid)
    if rep["problems"]:
        raise DataError(args.file, rep["problems"][0].split(": ", 1)[-1] if rep["records"] == 0
                        else f"{len(rep['problems'])} problem(s); run `leantune data check` to list them")
    st = pair_stats(rep)
    if getattr(args, "json", False):
        say(json.dumps(st, indent=2))
    else:
        for line in stats_lines(st):
            say(line)


PAIR_ACTIONS = {"check": data_check, "stats": data_stats}
