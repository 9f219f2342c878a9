import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: waking a second thread costs more than their arithmetic (on a busy 2-core
    machine a tiny FLUX forward takes 0.2 s on two threads and 2 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eval_prompt_file(tmp_path):
    path = tmp_path / "eval_prompts.txt"
    path.write_text("# held-out prompts for tests\na photo of a hand-drawn three\n\ndigit: seven\n")
    return path


@pytest.fixture
def tiny_overrides(eval_prompt_file):
    """A run of a few seconds: 2 prompts x 4 samples x 3 active steps per iteration, 2 eval prompts."""
    return [
        "train.prompts_per_iteration=2",
        "train.group_size=4",
        "plan.active_steps=first:3",
        "eval.seeds_per_prompt=2",
        f"prompts.eval={eval_prompt_file}",
    ]
