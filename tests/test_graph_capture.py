"""GraphRunner.try_capture against a stand-in for torch.cuda's stream and graph calls (runs on CPU): a failed
capture puts the caller's stream back before the step runs eagerly, and replays are counted."""
import warnings
from types import SimpleNamespace

import pytest
import torch

from coconut_fast.engine.cuda_graph import GraphRunner


class FakeCuda:
    """The torch.cuda calls try_capture makes, tracking which stream is current. Like torch.cuda.graph, the graph
    context ends the capture before it restores the stream, so a capture_end that raises leaves its stream current."""

    def __init__(self):
        self.caller, self.capture_stream = FakeStream("caller"), FakeStream("capture")
        self.current = self.caller

    def install(self, monkeypatch):
        fake = self
        calls = dict(current_stream=lambda device=None: fake.current, Stream=lambda device=None: FakeStream("side"),
                     stream=fake.stream, graph=fake.graph, CUDAGraph=FakeGraph, set_stream=fake.set_stream,
                     synchronize=lambda device=None: None)
        for name, value in calls.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def set_stream(self, stream):
        self.current = stream

    def stream(self, stream):
        fake = self

        class Context:
            def __enter__(self):
                self.before, fake.current = fake.current, stream

            def __exit__(self, *exc):
                fake.current = self.before

        return Context()

    def graph(self, graph, pool=None):
        fake = self

        class Context:
            def __enter__(self):
                self.before, fake.current = fake.current, fake.capture_stream

            def __exit__(self, exc_type, *exc):
                if exc_type is not None:
                    raise RuntimeError("capture_end: operation failed due to a previous error during capture")
                fake.current = self.before

        return Context()


class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def wait_stream(self, other):
        pass

    def __repr__(self):
        return f"<{self.name} stream>"


class FakeGraph:
    def __init__(self):
        self.replayed = 0

    def replay(self):
        self.replayed += 1


class Step:
    """A step body over one input tensor that it advances; it syncs with the host (raises) under capture when
    `syncs` is set, and records the stream of every call."""

    def __init__(self, cuda: FakeCuda, syncs: bool):
        self.cuda, self.syncs, self.streams = cuda, syncs, []
        self.position = torch.zeros(1)
        self.inputs = SimpleNamespace(snapshot=lambda: [self.position.clone()],
                                      restore=lambda saved: self.position.copy_(saved[0]))

    def __call__(self):
        self.streams.append(self.cuda.current)
        if self.syncs and self.cuda.current == self.cuda.capture_stream:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.position += 1


def capturing_runner():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # built on CPU: the no-CUDA notice
        runner = GraphRunner(None, None, 4, 2, torch.float32, torch.device("cpu"))
    runner.capture, runner.eager_reason = True, None
    return runner


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_a_failed_capture_restores_the_stream_before_the_eager_step(cuda):
    runner, step = capturing_runner(), Step(cuda, syncs=True)
    runner.bodies["decode", 1] = step
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        runner.run(("decode", 1))
    assert cuda.current == cuda.caller
    assert [s.name for s in step.streams] == ["side", "capture", "caller"]  # warm-up, capture, eager step
    assert step.position.item() == 1  # warm-up and failed capture undone; the eager step ran once
    assert ("decode", 1) not in runner.graphs and not runner.capture
    assert runner.eager_reason.startswith("CUDA graph capture failed (RuntimeError: capture_end")
    assert sum(runner.replays.values()) == 0


def test_a_captured_step_replays_and_is_counted(cuda):
    runner, step = capturing_runner(), Step(cuda, syncs=False)
    runner.bodies["decode", 1] = step
    runner.run(("decode", 1))
    runner.run(("decode", 1))
    assert cuda.current == cuda.caller and runner.eager_reason is None
    assert runner.graphs["decode", 1].replayed == 2 and runner.replays["decode", 1] == 2
    assert [s.name for s in step.streams] == ["side", "capture"]  # the replays run no Python
    assert step.position.item() == 1  # the warm-up undone; the capture's own step counts once (the fake runs it)
