import json

from trainer.cli import main


def test_validate_prints_resolved_recipe(tmp_path, capsys, pairs_file):
    path = tmp_path / "r.yaml"
    path.write_text(f"run_name: x\nmodel:\n  name_or_path: m\ndata:\n  train:\n    - kind: pairs\n      path: {pairs_file}\n")
    assert main(["validate", str(path), "data.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 16" in out and "temperature: 0.05" in out


def test_validate_misspelt_key_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("run_name: x\nmodel:\n  name_or_pth: m\ndata:\n  train: []\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'model.name_or_pth': unknown key; did you mean 'name_or_path'?" in err


def test_validate_reports_missing_data(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("run_name: x\nmodel:\n  name_or_path: m\ndata:\n  train:\n    - kind: pairs\n      path: nowhere.jsonl\n")
    assert main(["validate", str(path)]) == 1
    assert "data.train.0.path: nowhere.jsonl not found" in capsys.readouterr().err


def test_validate_reports_columns_a_file_lacks(tmp_path, capsys, pairs_file):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"run_name: x\nmodel:\n  name_or_path: m\ndata:\n  train:\n    - kind: pairs\n      path: {pairs_file}\n"
        "      negatives_column: hard_negatives\n"
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"data.train.0.negatives_column: {pairs_file} has no column 'hard_negatives'" in err
    assert "'query', 'positive', 'negatives'" in err


def test_train_with_missing_data_points_to_the_recipes_before_command(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        "# Run: embtrain train r.yaml\n# Before: embtrain prep mine --beir b --model m --out made.jsonl\n"
        "run_name: x\nmodel:\n  name_or_path: m\ndata:\n  train:\n    - kind: pairs\n      path: made.jsonl\n"
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.train.0.path: made.jsonl not found" in err and "(# Before:) that makes its data" in err


def test_eval_json_on_beir_and_sts(tmp_path, capsys, tiny_model, tiny_beir):
    assert main(["eval", str(tiny_model), "--beir", str(tiny_beir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    assert metrics["recall@100"] == 1.0  # 40 documents: everything is in the top 100
    sts = tmp_path / "sts.csv"
    sts.write_text("sentence1,sentence2,score\napple,apple,5\napple river,apple,3\nzebra,apple,0\ntiger,apple,1\n")
    assert main(["eval", str(tiny_model), "--sts", str(sts), "--sts-format", "csv", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert -1.0 <= metrics["spearman"] <= 1.0


def test_eval_bad_folder_is_a_clean_error(tmp_path, capsys, tiny_model):
    assert main(["eval", str(tiny_model), "--beir", str(tmp_path / "missing")]) == 2
    assert "BEIR folder not found" in capsys.readouterr().err
