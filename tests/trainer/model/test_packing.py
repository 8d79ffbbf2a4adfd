"""Packed forwards give the embeddings, loss and gradients of padded ones, with less padding."""

import random
from contextlib import nullcontext

import pytest
import torch

from conftest import assert_same, grads, tiny_decoder
from test_sub_batches import BACKWARD, LOSS, TOLERANCE, WORDS, load, varied
from trainer.config import LatentAttentionConfig
from trainer.data.collate import Collator
from trainer.data.examples import Example
from trainer.model.encoder import Encoder
from trainer.model.packing import INDEX, PACKED, SEGMENTS, PackingSupport, Rows, pack, place, unpack
from trainer.model.sub_batches import Packing, SubBatcher, attention_cost, bucket_length, packed_groups, sub_batches
from trainer.step import cached_step, plain_step


def packed_split(encoder: Encoder, **options) -> SubBatcher:
    support = encoder.find_packing()
    assert support is not None
    return SubBatcher(packing=Packing(support, always=True), **options)


def test_best_fit_places_every_text_once_inside_its_row():
    rng = random.Random(0)
    for _ in range(200):
        width = rng.randint(4, 40)
        lengths = [rng.randint(1, width) for _ in range(rng.randint(1, 30))]
        placement = place(lengths, width)
        taken = set()
        for start, length in zip(placement.starts, lengths):
            cells = set(range(start, start + length))
            assert start // width == (start + length - 1) // width  # within one row
            assert not cells & taken
            taken |= cells
        assert max(taken) < placement.rows * width
        assert placement.rows >= -(-sum(lengths) // width)
        if sum(lengths) <= width:
            assert placement.rows == 1
    with pytest.raises(ValueError, match="does not fit"):
        Rows(4).add(5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_then_unpack_gives_back_every_text(side):
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 0, 0]])
    if side == "left":
        ids = torch.tensor([[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 9, 10]])
    mask = (ids != 0).long()
    chunk = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "prompt_length": torch.tensor([1, 0, 1])}
    packed = pack(chunk, place([3, 1, 2], 4), position_offset=2)
    assert packed[PACKED + "input_ids"].shape == (2, 4) and packed["prompt_length"].tolist() == [1, 0, 1]
    assert packed[PACKED + "input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert packed[PACKED + "position_ids"].tolist() == [[2, 3, 4, 2], [2, 3, 0, 0]]
    assert packed[SEGMENTS].tolist() == [[0, 0, 0, 1], [2, 2, -1, -1]]
    texts = unpack(packed[PACKED + "input_ids"].unsqueeze(-1), packed).squeeze(-1) * packed["attention_mask"]
    assert texts.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert packed[INDEX].shape == (3, 3)


def test_packed_groups_respect_row_and_token_limits():
    rng = random.Random(1)
    for _ in range(200):
        lengths = sorted((rng.randint(1, 30) for _ in range(rng.randint(1, 40))), reverse=True)
        max_rows, max_tokens, buckets = rng.choice([None, 4, 9]), rng.choice([None, 40, 100]), rng.random() < 0.5
        groups = packed_groups(lengths, max_rows, max_tokens, buckets)
        assert sum(size for size, _ in groups) == len(lengths)
        start = 0
        for size, placement in groups:
            longest = lengths[start]
            assert placement.width == (bucket_length(longest) if buckets else longest)
            assert max_rows is None or size <= max_rows
            assert max_tokens is None or placement.rows * placement.width <= max_tokens or placement.rows == 1
            start += size


def test_the_check_finds_how_each_model_takes_packed_rows(tiny_model, tmp_path):
    assert load(tiny_model).find_packing() == PackingSupport(causal=False, additive_mask=False)
    assert load(tiny_model, attn_implementation="eager").find_packing() == PackingSupport(causal=False, additive_mask=True)
    folder = tiny_decoder(tmp_path / "qwen2")
    assert load(folder, pooling="last_token").find_packing() == PackingSupport(causal=True, additive_mask=False)
    assert load(folder, bidirectional=True).find_packing() == PackingSupport(causal=False, additive_mask=False)


def test_the_check_finds_robertas_positions(tmp_path):
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + "a short text second little longer than the first one three".split()))
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=40, pad_token_id=0)
    RobertaModel(config).save_pretrained(tmp_path)
    assert load(tmp_path).find_packing() == PackingSupport(causal=False, additive_mask=False, position_offset=1)


def test_the_check_refuses_a_model_that_ignores_position_ids(tiny_model):
    encoder = load(tiny_model)
    forward = encoder.backbone.forward
    encoder.backbone.forward = lambda position_ids=None, **inputs: forward(**inputs)  # positions dropped
    assert encoder.find_packing() is None and "does not give the same embeddings" in encoder.packing_refused


def test_the_check_runs_the_model_as_training_does(tiny_model):
    """In training mode (dropout at 0 for the check, and back afterwards): a model that drops
    the position ids only while training is refused; one that fails is refused, not raised."""
    encoder = load(tiny_model, attention_dropout=0.3).train()
    backbone = encoder.backbone
    forward = backbone.forward
    backbone.forward = lambda position_ids=None, **inputs: forward(**inputs, **({} if backbone.training else {"position_ids": position_ids}))
    assert encoder.find_packing() is None and encoder.training
    assert {m.p for m in backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.1, 0.3}  # hidden, attention: back

    def broken(**inputs):
        raise NotImplementedError("no 4D masks here")

    backbone.forward = broken
    assert encoder.find_packing() is None and "NotImplementedError: no 4D masks here" in encoder.packing_refused


def test_a_sliding_window_shorter_than_the_texts_is_refused(tmp_path):
    folder = tiny_decoder(tmp_path / "qwen2")
    encoder = load(folder, pooling="last_token")
    encoder.backbone.config.sliding_window = 8  # max_seq_length 16: the packed mask would drop the window
    assert encoder.find_packing() is None and "attention window (8 tokens)" in encoder.packing_refused
    encoder.backbone.config.sliding_window = 16
    assert encoder.find_packing() is not None


@pytest.mark.parametrize("family", ["bert", "bert-eager", "qwen2-left", "qwen2-bidirectional"])
@pytest.mark.parametrize("cached", [False, True])
def test_packed_steps_give_the_loss_and_gradients_of_padded_ones(tiny_model, tmp_path, family, cached):
    """float64, with hard negatives: BERT (SDPA and eager attention), a causal decoder padded on
    the left (last-token pooling) and a bidirectional one. A decoder's positions are exact here:
    packing, like the padded reference, starts each text at position 0."""
    if family.startswith("bert"):
        encoder = load(tiny_model, **({"attn_implementation": "eager"} if family == "bert-eager" else {}))
        rows = varied(10)
    else:
        folder = tiny_decoder(tmp_path / "qwen2")
        encoder = load(folder, **({"pooling": "last_token"} if family == "qwen2-left" else {"bidirectional": True}))
        encoder.tokenizer.padding_side = "left" if family == "qwen2-left" else "right"
        rows = [Example(e.query.replace(" ", "")[:12], e.positive.replace(" ", "")[:12], (e.negatives[0][:12],)) for e in varied(10)]
    batch = Collator(encoder.tokenizer, 16)(rows)

    def step(split):
        if cached:
            return cached_step(encoder, LOSS, batch, BACKWARD, False, 4, nullcontext, split=split)[0]
        return plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=split)[0]

    padded = SubBatcher(overhead_tokens=0)
    reference = step(padded)
    reference_grads = grads(encoder)
    packed = packed_split(encoder, overhead_tokens=0)
    if family == "qwen2-left":  # the reference's left padding moves rotary positions: rounding in float32 tables
        assert step(packed).item() == pytest.approx(reference.item(), rel=1e-6)
        for name, grad in grads(encoder).items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6 * reference_grads[name].abs().max().item(), msg=name)
    else:
        assert step(packed).item() == pytest.approx(reference.item(), abs=TOLERANCE)
        assert_same(grads(encoder), reference_grads)
    real, processed = packed.take_counts()
    assert real == padded.take_counts()[0] and real <= processed


@pytest.mark.parametrize("pool_prompt", [True, False])
def test_packed_embeddings_of_every_layer_and_without_the_prompt(tiny_model, pool_prompt):
    """2D Matryoshka's per-layer embeddings, each pooling, and a prompt left out of pooling."""
    for pooling in ("mean", "cls", "latent_attention") if pool_prompt else ("mean", "last_token"):
        encoder = load(tiny_model, pooling=pooling, pool_prompt=pool_prompt,
                       **({"latent_attention": LatentAttentionConfig(num_latents=4, num_heads=2)} if pooling == "latent_attention" else {}))
        support = encoder.find_packing()
        batch = Collator(encoder.tokenizer, 16, prompts=[("alpha beta ", "")], pool_prompt=pool_prompt)(varied(9, seed=3))
        padded = sub_batches(batch.queries)
        packed = sub_batches(batch.queries, packing=Packing(support, always=True))
        assert all(SEGMENTS in c for c in packed.chunks)
        with torch.no_grad():
            reference = padded.restore(torch.cat([encoder(c, layers=(1, 2)) for c in padded.chunks]))
            embeddings = packed.restore(torch.cat([encoder(c, layers=(1, 2)) for c in packed.chunks]))
        torch.testing.assert_close(embeddings, reference, rtol=0, atol=TOLERANCE)
        assert packed.padded_tokens < padded.padded_tokens


def test_auto_packs_short_varied_texts_and_leaves_texts_of_one_length_padded(tiny_model):
    encoder = load(tiny_model)
    packing = Packing(encoder.find_packing(), attention_cost=attention_cost(32))
    short = encoder.tokenize([e.query for e in varied(32, seed=4)])
    assert all(SEGMENTS in c for c in sub_batches(short, buckets=True, packing=packing).chunks)
    same = encoder.tokenize([" ".join(WORDS)] * 16)  # nothing to gain: rows as long as each text
    assert not any(SEGMENTS in c for c in sub_batches(same, buckets=True, packing=packing).chunks)


def test_packed_bf16_autocast_stays_near_float32(tiny_model):
    encoder = load(tiny_model).float()
    batch = Collator(encoder.tokenizer, 16)(varied(12, seed=6))
    split = packed_split(encoder)
    reference = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=split)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = plain_step(encoder, LOSS, batch, BACKWARD, cross_device=False, split=split)[0]
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)
