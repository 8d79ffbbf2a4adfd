"""The cached (GradCache) step and cross-device negatives give the plain step's loss and gradients."""

from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import assert_same, grads, make_pairs, run_processes
from trainer.config import InfoNCEConfig, ModelConfig
from trainer.data.collate import Collator
from trainer.data.examples import Example
from trainer.losses import LossContext, LossInput, build_loss
from trainer.losses.gradcache import embed_without_grad
from trainer.model.encoder import Encoder, enable_gradient_checkpointing
from trainer.model.sub_batches import SubBatcher
from trainer.step import cached_step, plain_step, split_documents

TOLERANCE = 1e-10  # float64 throughout


def examples(n: int = 8) -> list[Example]:
    return [Example(r["query"], r["positive"], tuple(r["negatives"])) for r in make_pairs(n, seed=3)]


def load(model_dir: Path) -> Encoder:
    torch.manual_seed(0)
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(model_dir), max_seq_length=16))
    return encoder.double()


def batch_of(encoder: Encoder, rows: list[Example], frozen: dict | None = None):
    from trainer.data.collate import TextTokenizer

    tokenizers = {key: TextTokenizer(e.tokenizer, 16, [("", "")]) for key, e in (frozen or {}).items()}
    return Collator(encoder.tokenizer, 16, frozen=tokenizers)(rows)


def teachers(loss_fn) -> dict[str, Encoder]:
    """The frozen models a loss names, loaded in float64 and perturbed so that they differ from the student."""
    out = {}
    for key, config in loss_fn.frozen_encoders().items():
        teacher = load(Path(config.name_or_path)).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in teacher.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        out[key] = teacher
    return out


LOSS = build_loss([InfoNCEConfig(kind="infonce", temperature=0.05)], LossContext(dim=32, normalized=True))


def BACKWARD(loss: torch.Tensor, **options) -> None:
    loss.backward(**options)


def test_cached_equals_plain_with_prompts_left_out_of_pooling(tiny_model):
    encoder = load(tiny_model).eval()
    encoder.config.pool_prompt = False
    rows = [Example(e.query, e.positive, e.negatives, source=i % 2) for i, e in enumerate(examples())]
    batch = Collator(encoder.tokenizer, 16, [("query : ", "passage : "), ("", "")], pool_prompt=False)(rows)
    plain_loss, _ = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False)
    plain = grads(encoder)
    cached_loss, _ = cached_step(encoder, LOSS, batch, BACKWARD, False, 3, nullcontext)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=TOLERANCE)
    assert_same(grads(encoder), plain)
    pooled_prompts = Collator(encoder.tokenizer, 16, [("query : ", "passage : "), ("", "")])(rows)
    assert plain_step(encoder, LOSS, pooled_prompts, BACKWARD, cross_device=False)[0].item() != pytest.approx(plain_loss.item())


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_cached_equals_plain_without_dropout(tiny_model, chunk_size):
    encoder = load(tiny_model).eval()
    batch = batch_of(encoder, examples())
    plain_loss, _ = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False)
    plain = grads(encoder)
    cached_loss, _ = cached_step(encoder, LOSS, batch, BACKWARD, False, chunk_size, nullcontext)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=TOLERANCE)
    assert_same(grads(encoder), plain)


def test_cached_replays_dropout_exactly(tiny_model):
    """With dropout on, the cached step equals a plain backward through the same chunks and masks."""
    encoder = load(tiny_model).train()
    batch = batch_of(encoder, examples())
    chunk = 3
    torch.manual_seed(11)
    q_split, d_split = SubBatcher()(batch.queries, max_rows=chunk), SubBatcher()(batch.documents, max_rows=chunk)
    q_chunks = q_split.chunks
    query = q_split.restore(torch.cat([encoder(c) for c in q_chunks]))
    documents = d_split.restore(torch.cat([encoder(c) for c in d_split.chunks]))
    positive, negatives = split_documents(documents, batch.size, batch.num_negatives)
    reference_loss, _ = LOSS(LossInput.of(query, positive, negatives))
    reference_loss.backward()
    reference = grads(encoder)

    torch.manual_seed(11)
    loss, _ = cached_step(encoder, LOSS, batch, BACKWARD, False, chunk, nullcontext)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=TOLERANCE)
    assert_same(grads(encoder), reference)

    # and the replay matters: the no-grad pass and a fresh pass draw different dropout masks
    torch.manual_seed(11)
    first, _ = embed_without_grad(encoder, q_chunks, torch.device("cpu"))
    second, _ = embed_without_grad(encoder, q_chunks, torch.device("cpu"))
    assert not torch.allclose(first, second)


def _worker(rank: int, world: int, init_file: str, model_dir: str, out_dir: str) -> None:
    # a timeout turns a stuck collective into an error instead of a hung test
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        encoder = load(Path(model_dir)).eval()
        model = torch.nn.parallel.DistributedDataParallel(encoder)
        rows = examples()
        local = rows[rank * 4 : rank * 4 + 4]
        results = {}
        for name, configs in [("infonce", None)] + list(loss_configs(model_dir).items()):
            loss_fn = LOSS if configs is None else build(configs)
            frozen = teachers(loss_fn)
            batch = batch_of(encoder, local, frozen)
            parameters = list(loss_fn.parameters())
            wrapped = torch.nn.parallel.DistributedDataParallel(loss_fn) if parameters else loss_fn
            layers = loss_fn.layer_indices()
            loss, _ = plain_step(model, wrapped, batch, BACKWARD, cross_device=True, frozen=frozen, layers=layers)
            plain = grads(encoder) | grads(loss_fn)
            cached, _ = cached_step(
                model, wrapped, batch, BACKWARD, True, 3, model.no_sync, frozen=frozen, loss_parameters=parameters,
                layers=layers,
            )
            cached_grads = grads(encoder) | grads(loss_fn)
            results[name] = {"loss": loss.item(), "cached_loss": cached.item(), "grads": plain, "cached_grads": cached_grads}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch(tiny_model, tmp_path):
    run_processes(_worker, (2, str(tmp_path / "init"), str(tiny_model), str(tmp_path)), nprocs=2)
    encoder = load(tiny_model).eval()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, configs in [("infonce", None)] + list(loss_configs(tiny_model).items()):
        loss_fn = LOSS if configs is None else build(configs)
        frozen = teachers(loss_fn)
        batch = batch_of(encoder, examples(), frozen)
        loss, _ = plain_step(encoder, loss_fn, batch, BACKWARD, cross_device=False, frozen=frozen, layers=loss_fn.layer_indices())
        single = grads(encoder) | grads(loss_fn)
        for result in results:
            assert result[name]["loss"] == pytest.approx(loss.item(), abs=TOLERANCE), name
            assert result[name]["cached_loss"] == pytest.approx(loss.item(), abs=TOLERANCE), name
            assert_same(result[name]["grads"], single)
            assert_same(result[name]["cached_grads"], single)


def test_gradient_checkpointing_keeps_gradients(tiny_model):
    encoder = load(tiny_model).eval()
    batch = batch_of(encoder, examples())
    plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False)
    reference = grads(encoder)
    enable_gradient_checkpointing(encoder.backbone)
    assert any(getattr(m, "gradient_checkpointing", False) for m in encoder.backbone.modules())
    encoder.train()  # checkpointing is only active in training mode; dropout off to compare
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False)
    assert_same(grads(encoder), reference)
    cached_step(encoder, LOSS, batch, BACKWARD, False, 3, nullcontext)
    assert_same(grads(encoder), reference)


def loss_configs(model_dir: Path | str = "teacher"):
    from trainer.losses.adaptive_layers import AdaptiveLayersConfig
    from trainer.losses.distill_kl import DistillKLConfig
    from trainer.losses.embed_distill import EmbedDistillConfig
    from trainer.losses.gor import GORConfig
    from trainer.losses.jasper import JasperConfig
    from trainer.losses.margin_mse import MarginMSEConfig
    from trainer.losses.matryoshka import MatryoshkaConfig
    from trainer.model.frozen import FrozenModelConfig

    teacher = FrozenModelConfig(name_or_path=str(model_dir))

    gte = InfoNCEConfig(
        kind="infonce", directions=["query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc"],
        hardness_mode="all_negatives", hardness_strength=5.0, focal_gamma=1.0, false_negative_margin=0.3,
    )
    return {
        "matryoshka": [MatryoshkaConfig(kind="matryoshka", dims=[32, 16, 8], terms=[InfoNCEConfig(kind="infonce")])],
        "gte+gor": [gte, GORConfig(kind="gor", weight=0.3)],
        "learned-temperature": [InfoNCEConfig(kind="infonce", learn_temperature=True, temperature=0.05)],
        "matryoshka-gor-only": [MatryoshkaConfig(kind="matryoshka", dims=[32, 8], terms=[GORConfig(kind="gor")])],
        "2d-matryoshka": [
            AdaptiveLayersConfig(
                kind="adaptive_layers", layers_per_step=None, layer_weighting="linear",
                terms=[MatryoshkaConfig(kind="matryoshka", dims=[32, 8], terms=[InfoNCEConfig(kind="infonce")])],
            )
        ],
        "distillation": [  # an online teacher, in-batch candidates, a projection (a loss parameter)
            DistillKLConfig(kind="distill_kl", teacher=teacher),
            MarginMSEConfig(kind="margin_mse", teacher=teacher, weight=0.5),
            MatryoshkaConfig(kind="matryoshka", dims=[32, 8], terms=[EmbedDistillConfig(kind="embed_distill", teacher=teacher, projection=True)]),
            JasperConfig(kind="jasper", teacher=teacher, weight=0.1),
        ],
    }


def build(configs) -> torch.nn.Module:
    return build_loss(configs, LossContext(dim=32, normalized=True, num_layers=2)).double()


@pytest.mark.parametrize("name", list(loss_configs()))
def test_cached_equals_plain_for_every_loss(tiny_model, name):
    """Loss and gradients of the encoder and of the loss's own parameters, float64."""
    encoder = load(tiny_model).eval()
    loss_fn = build(loss_configs(tiny_model)[name])
    frozen = teachers(loss_fn)
    batch = batch_of(encoder, examples(), frozen)
    layers = loss_fn.layer_indices()
    plain_loss, _ = plain_step(encoder, loss_fn, batch, BACKWARD, cross_device=False, frozen=frozen, layers=layers)
    plain = grads(encoder) | grads(loss_fn)
    parameters = list(loss_fn.parameters())
    cached_loss, _ = cached_step(
        encoder, loss_fn, batch, BACKWARD, False, 3, nullcontext, frozen=frozen, loss_parameters=parameters, layers=layers
    )
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=TOLERANCE)
    assert_same(grads(encoder) | grads(loss_fn), plain)
    assert bool(parameters) == (name in ("learned-temperature", "distillation"))


@pytest.mark.parametrize("single_texts", [False, True])
def test_cached_equals_plain_for_distillation(tiny_model, single_texts):
    """Online-teacher terms (a projection among their parameters), on pairs and on single texts."""
    from trainer.data.collate import TextTokenizer
    from trainer.losses.distill_kl import DistillKLConfig
    from trainer.losses.embed_distill import EmbedDistillConfig
    from trainer.losses.jasper import JasperConfig
    from trainer.losses.margin_mse import MarginMSEConfig
    from trainer.model.frozen import FrozenModelConfig, frozen_key

    encoder = load(tiny_model).eval()
    teacher = load(tiny_model).eval().requires_grad_(False)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = FrozenModelConfig(name_or_path=str(tiny_model))
    key = frozen_key(config)
    rows = examples()
    if single_texts:
        rows = [Example(r.query, None) for r in rows]
    batch = Collator(encoder.tokenizer, 16, frozen={key: TextTokenizer(teacher.tokenizer, 16, [("", "")])})(rows)
    loss_fn = build([
        DistillKLConfig(kind="distill_kl", teacher=config),
        MarginMSEConfig(kind="margin_mse", teacher=config),
        EmbedDistillConfig(kind="embed_distill", teacher=config, projection=True),
        JasperConfig(kind="jasper", teacher=config),
    ])
    plain_loss, parts = plain_step(encoder, loss_fn, batch, BACKWARD, cross_device=False, frozen={key: teacher})
    assert set(parts) == ({"embed_distill_2", "jasper_3"} if single_texts else {"distill_kl_0", "margin_mse_1", "embed_distill_2", "jasper_3"})
    plain = grads(encoder) | grads(loss_fn)
    cached_loss, _ = cached_step(
        encoder, loss_fn, batch, BACKWARD, False, 3, nullcontext, frozen={key: teacher},
        loss_parameters=list(loss_fn.parameters()),
    )
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=TOLERANCE)
    assert_same(grads(encoder) | grads(loss_fn), plain)
    assert not any(p.grad is not None for p in teacher.parameters())
