"""The references are the spec: checked by hand, and they must export to ONNX (the export path uses them)."""

import numpy as np
import torch

from leader_edge.kernels import reference


def test_reference_embedding_bag_by_hand():
    weight = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    codes = torch.tensor([[0, 2, -1], [-1, -1, -1], [1, 1, 0]])  # padded, empty, repeated
    torch.testing.assert_close(reference.embedding_bag(weight, codes, "sum"),
                               torch.tensor([[5.0, 50.0], [0.0, 0.0], [5.0, 50.0]]))
    torch.testing.assert_close(reference.embedding_bag(weight, codes, "mean"),
                               torch.tensor([[2.5, 25.0], [0.0, 0.0], [5 / 3, 50 / 3]]))


def test_reference_wide_max_head_by_hand():
    x, weight, bias = torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([[1.0, -1.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0])
    table = torch.tensor([[0.5, -1.0], [2.0, -3.0], [9.0, 9.0]])
    codes = torch.tensor([[0, 1, 1], [-1, -1, -1]])  # row 0: max of rows 0, 1, 1 = [2, -1]; row 1: no code, adds 0
    # deep logits [1 - 2 + 1, 0] = [0, 0] for both rows; extra adds [1, 1] to row 1
    extra = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    logits = reference.wide_max_head(x, weight, bias, table, codes, extra)
    torch.testing.assert_close(logits, torch.tensor([[2.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(reference.wide_max_head(x, weight, bias, None, None), torch.zeros(2, 2))
    loss, prob = reference.wide_max_head_loss(x, weight, bias, None, None, None, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # logits 0: probabilities 0.5, loss log 2 whatever the target
    torch.testing.assert_close(prob, torch.full((2, 2), 0.5))
    torch.testing.assert_close(loss, torch.tensor(np.log(2.0), dtype=torch.float32))


class _BagHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(30, 8, generator=gen))
        self.weight = torch.nn.Parameter(torch.randn(5, 8, generator=gen))
        self.bias = torch.nn.Parameter(torch.randn(5, generator=gen))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return reference.wide_max_head(reference.embedding_bag(self.table, codes, "mean"), self.weight, self.bias,
                                       None, None, None, True)


def test_reference_exports_to_onnx_with_dynamic_shapes(tmp_path):
    import onnxruntime

    model, path = _BagHead().eval(), tmp_path / "bag_head.onnx"
    dims = {"codes": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}}
    torch.onnx.export(model, (torch.tensor([[1, 2, -1], [-1, -1, -1], [4, 4, 29]]),), str(path),
                      input_names=["codes"], dynamic_shapes=dims, dynamo=True, verbose=False)
    codes = torch.randint(-1, 30, (7, 5), generator=torch.Generator().manual_seed(1))
    codes[0] = -1
    (out,) = onnxruntime.InferenceSession(str(path)).run(None, {"codes": codes.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(codes).numpy(), atol=1e-6)
