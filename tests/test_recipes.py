"""Training recipes by model family."""

from __future__ import annotations

import pytest
from torch import nn

from tlc.train.recipes import describe, model_family, recipe


def test_the_family_of_a_model():
    assert model_family(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == "cnn"
    assert model_family(nn.TransformerEncoderLayer(16, 2)) == "transformer"
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    assert model_family(transformers.BertForSequenceClassification(cfg)) == "transformer"


def test_transformers_fine_tune_with_adamw_at_a_small_learning_rate():
    finetune = recipe("transformer", "finetune", epochs=0.5)
    assert (finetune.optimizer, finetune.lr, finetune.batch_size, finetune.epochs) == ("adamw", 2e-5, 32, 0.5)
    assert finetune.warmup_steps > 0
    assert recipe("cnn", "finetune").optimizer == "sgd"
    assert recipe("cnn", "paper") is None  # the preset's own retraining stands
    assert "AdamW lr 2e-05" in describe(finetune)
    with pytest.raises(ValueError, match="family"):
        recipe("rnn", "finetune")


def test_the_command_line_fine_tunes_a_transformer_with_its_family_s_recipe(capsys):
    import argparse

    from tlc.cli import _family_recipe
    from tlc.run.config import RunConfig

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    bert = transformers.BertForSequenceClassification(cfg)
    args = argparse.Namespace(preset="default", lr=None, batch_size=None, finetune_epochs=None, optimizer=None,
                              weight_decay=None)
    run = _family_recipe(bert, RunConfig(), args)
    assert (run.finetune.optimizer, run.finetune.lr, run.finetune.batch_size) == ("adamw", 2e-5, 32)
    assert "fine-tuning recipe (transformer): AdamW lr 2e-05" in capsys.readouterr().out
    paper = _family_recipe(bert, RunConfig(), argparse.Namespace(**{**vars(args), "preset": "paper"}))
    assert paper.finetune.epochs == 3.0  # the paper's BERT recipe, not 160 epochs of SGD
    own = _family_recipe(bert, RunConfig(), argparse.Namespace(**{**vars(args), "lr": 0.001}))
    assert own.finetune == RunConfig().finetune  # a learning rate on the command line: the user's recipe
    chosen = _family_recipe(bert, RunConfig(), argparse.Namespace(**{**vars(args), "optimizer": "sgd"}))
    assert chosen.finetune == RunConfig().finetune
    cnn = _family_recipe(nn.Sequential(nn.Conv2d(1, 2, 3)), RunConfig(), args)
    assert cnn.finetune == RunConfig().finetune
