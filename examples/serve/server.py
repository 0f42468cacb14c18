"""An early-exit model served with LitServe (dynamic batching), its thresholds kept by bx.OnlineCalibrator.

Start it (loopback only; port and batching are flags):

    PYTHONPATH=$PWD python examples/serve/server.py --host 127.0.0.1 --port 8000

Send ``POST /predict`` with ``{"image": [[...8 x 8 floats...]]}`` (an 8x8 grey digit, as sklearn's
``load_digits`` gives); the answer is ``{"label": int, "exit": int, "audited": bool}``. LitServe gathers up to
``--max-batch-size`` requests (waiting at most ``--batch-timeout`` seconds) into one batch, and the calibrator
serves the batch: each sample leaves at its exit, a random share runs the whole model as an audit, and the
thresholds follow what the audit sees. Its state (``bx.OnlineCalibrator.save``) is written to ``--state``
every ``--save-every`` batches, and read back at start when the file exists, so a restart carries on.

``--checkpoint`` serves a module written by ``bx.save`` (its spec already calibrated); without it a small
MLP is trained on digits at start (a few seconds) and calibrated with ``bx.calibrate``. One inference worker
(``workers_per_device=1``): the calibrator's state lives in that process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import torch
from fastapi import HTTPException
from torch import nn

import branchify as bx


def demo_module() -> nn.Module:
    """A digits MLP with one exit, trained briefly, its threshold certified on held-out digits."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    spec = bx.ExitSpec(exits=[bx.ExitPoint(layer="1", criterion="confidence", weight=0.3)])
    module = bx.attach_exits(model, spec, x[:1])
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1200], y[:1200]), batch_size=64,
                                        shuffle=True, generator=torch.Generator().manual_seed(0))
    bx.fit(module, train, epochs=10, lr=3e-3, progress=False)
    module.eval()
    held = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[1200:], y[1200:]), batch_size=128)
    module.exit_spec = bx.calibrate(module, held, max_accuracy_drop=0.02, progress=False).spec
    return module


class EarlyExitAPI(ls.LitAPI):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
        self.args = args

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        args = self.args
        module = bx.load(args.checkpoint).eval() if args.checkpoint else demo_module()
        runner = bx.ExitRunner(module)
        self.state = Path(args.state)
        settings = dict(max_disagreement=args.max_disagreement, audit_rate=args.audit_rate, window=args.window)
        self.online = (bx.OnlineCalibrator.load(self.state, runner) if self.state.exists()
                       else bx.OnlineCalibrator(runner, **settings))
        self.batches = 0

    def decode_request(self, request: dict) -> torch.Tensor:
        image = torch.as_tensor(request["image"], dtype=torch.float32)
        if image.shape != (8, 8):
            raise HTTPException(status_code=422, detail=f"image must be 8 x 8, got {tuple(image.shape)}")
        return image.flatten() / 16.0

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> list[dict]:
        result = self.online(x)
        self.batches += 1
        if self.batches % self.args.save_every == 0:
            self.online.save(self.state)
        return [{"label": int(label), "exit": int(e), "audited": bool(a)}
                for label, e, a in zip(result.logits.argmax(-1), result.exit_index, result.audited)]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve an early-exit model with LitServe and bx.OnlineCalibrator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--checkpoint", default=None, help="a module written by bx.save (default: the demo MLP)")
    parser.add_argument("--state", default="online-state.json", help="where the calibrator's state is kept")
    parser.add_argument("--save-every", type=int, default=20, help="batches between two saves of the state")
    parser.add_argument("--max-disagreement", type=float, default=0.02)
    parser.add_argument("--audit-rate", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    args = parser.parse_args(argv)
    server = ls.LitServer(EarlyExitAPI(args), accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
