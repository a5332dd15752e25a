"""kiln.onnx is an optional extra: the core never imports onnx or onnxruntime."""

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_kiln_does_not_import_onnx():
    r = _run("import sys, kiln, kiln.onnx\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('onnx', 'onnxruntime')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_onnx_names_the_install_line():
    # a meta path finder that hides onnx, as on a machine without the extra
    code = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('onnx', 'onnxruntime'):\n"
            "            raise ImportError('hidden: ' + name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from kiln.onnx._deps import require\n"
            "try:\n"
            "    require('onnx')\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert 'pip install "kiln[onnx]"' in r.stdout
    assert "onnx package" in r.stdout
