"""The fast/slow rule of tests/conftest.py holds itself: a test not marked slow cannot start a process."""
import subprocess
import sys

import pytest


def test_a_fast_test_that_starts_a_process_fails_and_says_why():
    with pytest.raises(AssertionError, match=r"starts a process .*mark it @pytest\.mark\.slow"):
        subprocess.run([sys.executable, "-c", "pass"])


@pytest.mark.slow
def test_a_slow_test_starts_processes():
    assert subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True).stdout == "ok\n"
