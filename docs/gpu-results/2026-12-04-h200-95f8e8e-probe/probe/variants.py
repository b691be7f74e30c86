"""Write patched copies of ptr_kernels for the A/B probe: variants.py DEST (DEST/<variant>/ptr_kernels)."""
import os, re, shutil, sys
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ptr_kernels")
dest = sys.argv[1]

def patch(path, old, new, count=1):
    s = open(path).read()
    assert s.count(old) == count, (path, old, s.count(old))
    open(path, "w").write(s.replace(old, new))

HIST = "                hist += tl.histogram(tl.reshape(key_bin, [BLOCK]), ids.SELECT_BINS, mask=tl.reshape(in_window, [BLOCK]))"
variants = {
    "v0": [],
    "v2stage": [("ops/token.py", "SELECT: tl.constexpr = QUANTILE and ROWS == 1", "SELECT: tl.constexpr = False"),
                ("ops/runtime.py", "return 3 if quantile and block == ids.TILE.value else 2", "return 2")],
    "vnohist": [("ops/token.py", HIST, "                pass")],
    "vatomic": [("ops/token.py", HIST, "                tl.atomic_add(select_row + ids.SELECT_HIST + key_bin, 1, mask=in_window, sem=\"relaxed\")")],
}
for name, patches in variants.items():
    d = os.path.join(dest, name, "ptr_kernels")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("__pycache__"))
    for f, old, new in patches:
        patch(os.path.join(d, f), old, new)
print("variants:", " ".join(variants))
