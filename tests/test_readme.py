"""The README's TensorFlow snippet works on a real output, as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_reading_snippet_runs(run_output, capsys):
    _, out = run_output
    text = README.read_text()
    block = re.search(r"<!-- snippet:read -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert 'out = "output"' in block
    ns = {}
    exec(compile(block.replace('out = "output"', f"out = {out!r}"), "README", "exec"), ns)
    assert "(64, 300, 16) (64, 6) (64, 8)" in capsys.readouterr().out
    prop = ns["propofol"].numpy()
    assert prop.shape == (64,) and (prop >= 0).all() and (prop <= 12).all()
