#!/usr/bin/env python3
"""Lists import circles between sibling modules of every crate under crates/.

A module imports a sibling when its code (or its submodules' code) names
`crate::sibling`, `super::sibling` (from the parent's level) or `self::sibling`
paths. Edges from a child to its own parent are the normal Rust shape and are not
counted. Exits 1 and prints each circle when one exists.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates")
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)::\{([^;]*)\};", re.S)


def module_path(src_dir, path):
    rel = os.path.relpath(path, src_dir)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(rel)


def references(text, mod):
    """Absolute module paths (tuples) this file's code names."""
    text = re.sub(r"//[^\n]*", "", text)
    # `mod tests` blocks import freely; tests are not part of the module graph.
    cut = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    if cut:
        text = text[: cut.start()]
    out = []

    def resolve(kind, segs):
        if kind == "crate":
            return tuple(segs)
        if kind == "self":
            return mod + tuple(segs)
        base = list(mod)
        while segs and segs[0] == "super":
            segs = segs[1:]
            base = base[:-1]
        return tuple(base[:-1]) + tuple(segs)

    for m in USE_GROUP_RE.finditer(text):
        kind = m.group(1)
        for item in re.split(r",", m.group(2)):
            first = item.strip().split("::")[0].strip()
            if re.fullmatch(r"[a-z_][a-z0-9_]*", first or "-"):
                out.append(resolve(kind, [first]))
    for m in PATH_RE.finditer(text):
        segs = [s for s in m.group(2).split("::") if s]
        out.append(resolve(m.group(1), segs))
    return out


def crate_cycles(src_dir):
    mods = {}
    for dirpath, _, files in os.walk(src_dir):
        if os.path.relpath(dirpath, src_dir).split(os.sep)[0] == "bin":
            continue
        for f in files:
            if f.endswith(".rs"):
                p = os.path.join(dirpath, f)
                mods[module_path(src_dir, p)] = open(p, encoding="utf-8").read()
    known = set(mods)
    edges = {}
    for mod, text in mods.items():
        for ref in references(text, mod):
            # Longest known module that prefixes the reference.
            target = max((k for k in known if ref[: len(k)] == k), key=len, default=None)
            if target is None:
                continue
            # The level at which both sit as siblings.
            common = 0
            while common < min(len(mod), len(target)) and mod[common] == target[common]:
                common += 1
            if common >= len(mod) or common >= len(target):
                continue  # parent/child
            a, b = mod[: common + 1], target[: common + 1]
            edges.setdefault(a, set()).add(b)
    cycles = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start and len(path) > 1:
                    cyc = path[:]
                    if min(cyc) == start:
                        cycles.append(cyc)
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return cycles


def main():
    bad = False
    for crate in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, crate, "src")
        if not os.path.isdir(src):
            continue
        for cyc in crate_cycles(src):
            bad = True
            print(f"{crate}: " + " -> ".join("::".join(m) for m in cyc + [cyc[0]]))
    if not bad:
        print("no import circles")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
