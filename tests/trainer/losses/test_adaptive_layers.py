import json
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig, load_recipe
from trainer.errors import RunError
from trainer.losses import LossContext, LossInput, build_loss
from trainer.losses.adaptive_layers import AdaptiveLayersConfig
from trainer.losses.infonce import InfoNCEConfig
from trainer.losses.inputs import Embeddings
from trainer.losses.matryoshka import MatryoshkaConfig
from trainer.model.encoder import Encoder
from trainer.schema import FieldError

CONTEXT = LossContext(dim=16, normalized=True, num_layers=3)


def unit(*shape, seed=0):
    torch.manual_seed(seed)
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def with_layers(count=3, size=5):
    """Final embeddings and those of layers 0 .. count-1, each with one hard negative."""
    final = Embeddings(unit(size, 16, seed=1), unit(size, 16, seed=2), unit(size, 1, 16, seed=3))
    layers = {k: Embeddings(unit(size, 16, seed=10 * k + 4), unit(size, 16, seed=10 * k + 5), unit(size, 1, 16, seed=10 * k + 6)) for k in range(count)}
    return LossInput.of(final.query, final.positive, final.negatives, layers=layers)


def adaptive(terms, **options):
    return AdaptiveLayersConfig(kind="adaptive_layers", terms=terms, **options).build(CONTEXT)


def kl(student: Embeddings, teacher: Embeddings, temperature: float) -> float:
    """KL(softmax(teacher/T) || softmax(student/T)) per text, averaged over every text, by hand."""
    rows_s = [student.query, student.positive, student.negatives[:, 0]]
    rows_t = [teacher.query, teacher.positive, teacher.negatives[:, 0]]
    total, count = 0.0, 0
    for s_block, t_block in zip(rows_s, rows_t):
        for s, t in zip(s_block.tolist(), t_block.tolist()):
            ps = [math.exp(v / temperature) for v in s]
            pt = [math.exp(v / temperature) for v in t]
            ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
            count += 1
    return total / count


def test_sums_the_terms_over_layers_with_weights_and_kl():
    inputs = with_layers()
    inner = InfoNCEConfig(kind="infonce", temperature=0.05)
    loss = adaptive([inner], layers_per_step=None, last_layer_weight=2.0, prior_layers_weight=0.5, layer_weighting="log", kl_weight=3.0)
    infonce = inner.build(CONTEXT)
    expected = 2.0 * infonce(inputs).item()
    for layer in range(3):
        at_layer = inputs.layers[layer]
        term = infonce(LossInput.of(at_layer.query, at_layer.positive, at_layer.negatives)).item()
        expected += 0.5 * (1 / (1 + math.log(1 + layer))) / 3 * term
        expected += 3.0 * 0.3 * kl(at_layer, inputs.embeddings, 0.3)
    assert loss(inputs).item() == pytest.approx(expected, abs=1e-9)


def test_kl_temperature_zero_drops_the_kl_term_and_the_teacher_gets_no_gradient():
    inputs = with_layers()
    inner = InfoNCEConfig(kind="infonce")
    without = adaptive([inner], layers_per_step=None, kl_temperature=0.0)(inputs)
    infonce = inner.build(CONTEXT)
    terms = infonce(inputs) + sum(infonce(inputs.at_layer(k)) for k in range(3)) / 3
    assert without.item() == pytest.approx(terms.item(), abs=1e-10)

    # with KL, the final embeddings' gradient comes from the terms alone
    leaves = inputs.embeddings.map(lambda t: t.clone().requires_grad_())
    with_kl = adaptive([inner], layers_per_step=None, last_layer_weight=0.0, prior_layers_weight=0.0)
    with_kl(inputs.with_embeddings(leaves)).backward()
    assert all(t.grad is None or not t.grad.any() for t in leaves.tensors())


def test_layers_per_step_samples_a_subset_of_the_layers():
    inputs = with_layers()
    inner = InfoNCEConfig(kind="infonce")
    each = {adaptive([inner], layers=[k])(inputs).item() for k in range(3)}
    loss = adaptive([inner], layers_per_step=1)
    seen = {round(loss(inputs).item(), 8) for _ in range(40)}
    assert seen == {round(v, 8) for v in each}


def test_wraps_matryoshka_and_asks_for_its_layers():
    inputs = with_layers()
    matryoshka = MatryoshkaConfig(kind="matryoshka", dims=[16, 8], terms=[InfoNCEConfig(kind="infonce")])
    loss = build_loss([AdaptiveLayersConfig(kind="adaptive_layers", layers=[2, 0], layers_per_step=None, terms=[matryoshka])], CONTEXT)
    assert loss.layer_indices() == (0, 2)
    inner = matryoshka.build(CONTEXT)
    expected = inner(inputs) + (inner(inputs.at_layer(0)) + inner(inputs.at_layer(2))) / 2
    expected += 0.3 * sum(kl(inputs.layers[k], inputs.embeddings, 0.3) for k in (0, 2))
    assert loss(inputs)[0].item() == pytest.approx(expected.item(), abs=1e-9)
    # Matryoshka around adaptive layers cuts the earlier layers' embeddings too
    cut = inputs.truncated(8)
    assert cut.layers[1].query.shape == (5, 8)
    torch.testing.assert_close(cut.layers[1].query, F.normalize(inputs.layers[1].query[:, :8], dim=-1))


def test_bad_layers():
    inner = [InfoNCEConfig(kind="infonce")]
    with pytest.raises(RunError, match=r"layers \[3\] are not earlier layers: the model has 3 layers"):
        adaptive(inner, layers=[1, 3])
    with pytest.raises(RunError, match="num_hidden_layers"):
        AdaptiveLayersConfig(kind="adaptive_layers", terms=inner).build(LossContext(dim=16, normalized=True))
    with pytest.raises(FieldError, match="twice"):
        AdaptiveLayersConfig(kind="adaptive_layers", terms=inner, layers=[1, 1])
    with pytest.raises(FieldError, match="layers_per_step"):
        AdaptiveLayersConfig(kind="adaptive_layers", terms=inner, layers_per_step=0)
    nested = AdaptiveLayersConfig(kind="adaptive_layers", terms=inner)
    with pytest.raises(FieldError, match="cannot hold another"):
        AdaptiveLayersConfig(kind="adaptive_layers", terms=[nested])


def test_recipe_reads_the_nested_terms(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "run_name: r\nmodel: {name_or_path: m}\ndata: {train: [{kind: pairs, path: x.jsonl}]}\n"
        "loss:\n  - kind: adaptive_layers\n    layers_per_step: 2\n    terms:\n"
        "      - kind: matryoshka\n        dims: [16, 8]\n        terms: [{kind: infonce}]\n"
    )
    (config,) = load_recipe(path).loss
    assert isinstance(config, AdaptiveLayersConfig) and config.layers_per_step == 2
    assert isinstance(config.terms[0], MatryoshkaConfig)


def test_encoder_pools_earlier_layers(tiny_model):
    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).eval()
    features = encoder.tokenize(["alpha beta", "gamma delta epsilon"])
    with torch.no_grad():
        final = encoder(features)
        stacked = encoder(features, layers=(0, 1, 2))
        states = encoder.backbone(**features, output_hidden_states=True).hidden_states
    assert stacked.shape == (2, 4, 32) and encoder.num_layers == 2
    torch.testing.assert_close(stacked[:, 0], final)
    torch.testing.assert_close(stacked[:, 3], final)  # the output of the last layer is the final embedding
    mask = features["attention_mask"].unsqueeze(-1).float()
    layer1 = F.normalize((states[1] * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(stacked[:, 2], layer1)


def test_a_decoders_earlier_layer_is_what_the_model_cut_to_that_layer_gives(tmp_path):
    """Llama and Qwen2 norm the last layer's output only; the earlier layers go through that norm
    too, so the loss trains what `model.num_layers` (export --layers) then serves."""
    from transformers import Qwen2Config, Qwen2Model, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "alpha", "beta", "gamma", "delta"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    Qwen2Model(config).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    settings_file = tmp_path / "tokenizer_config.json"  # not Qwen2's own tokenizer class, which the model type implies
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    settings = {"name_or_path": str(tmp_path), "pooling": "last_token", "max_seq_length": 16}
    full = Encoder.from_config(ModelConfig(**settings)).eval()
    cut = Encoder.from_config(ModelConfig(**settings, num_layers=2)).eval()
    features = {"input_ids": torch.tensor([[2, 3, 4], [5, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(full(features, layers=(2,))[:, 1], cut(features))
        torch.testing.assert_close(full(features, layers=(3,))[:, 1], full(features))


def test_equals_sentence_transformers_adaptive_layer_loss(tiny_model):
    """The same model, texts and settings through sentence-transformers' AdaptiveLayerLoss(MNRL)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    queries = ["alpha beta", "gamma delta", "epsilon zeta eta", "theta iota"]
    positives = ["alpha beta gamma", "delta gamma", "zeta eta", "iota kappa theta"]
    negatives = ["kappa", "alpha zeta", "beta beta", "gamma eta iota"]
    transformer = Transformer(str(tiny_model), max_seq_length=16)
    st_model = SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()]).eval()
    st_model.double()
    st_loss = losses.AdaptiveLayerLoss(
        st_model, losses.MultipleNegativesRankingLoss(st_model, scale=20.0),
        n_layers_per_step=-1, layer_weighting="linear", kl_temperature=0.3,
    )
    features = [st_model.tokenize(texts) for texts in (queries, positives, negatives)]
    expected = st_loss(features, None).item()

    encoder = Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).double().eval()
    loss = build_loss(
        [AdaptiveLayersConfig(kind="adaptive_layers", layers_per_step=None, layer_weighting="linear", terms=[InfoNCEConfig(kind="infonce")])],
        LossContext(dim=32, normalized=True, num_layers=2),
    )
    layers = loss.layer_indices()
    q, p, n = (encoder(encoder.tokenize(texts), layers=layers) for texts in (queries, positives, negatives))
    split = lambda t: {k: t[:, i] for i, k in enumerate(layers, start=1)}  # noqa: E731
    inputs = LossInput.of(
        q[:, 0], p[:, 0], n[:, 0].unsqueeze(1),
        layers={k: Embeddings(split(q)[k], split(p)[k], split(n)[k].unsqueeze(1)) for k in layers},
    )
    assert layers == (0, 1)
    assert loss(inputs)[0].item() == pytest.approx(expected, abs=1e-9)
