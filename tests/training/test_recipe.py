"""The training recipe's knobs: warm-up + cosine, weight decay, label smoothing, mixup, flip TTA, the compact
stem. Real Keras on tiny models; the end-to-end run goes through ``run_train`` on the demo data."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from kfer import tracking
from kfer.errors import UserError
from kfer.serving.layers import HorizontalFlip, with_flip_tta
from kfer.training.inputs import make_dataset, mixup
from kfer.training.model import build_resnet
from kfer.training.schedule import lr_at, make_optimizer
from kfer.training.train import run_train
from tests.helpers import TINY, prepare_demo


def test_warmup_then_cosine_per_batch(make_params):
    p = make_params({"train": {"epochs": 4, "learning_rate": 0.01, "warmup_epochs": 1, "lr_schedule": "cosine"}})
    steps = 10
    lrs = [lr_at(p, s, steps) for s in range(4 * steps)]
    assert lrs[:10] == pytest.approx([0.001 * (i + 1) for i in range(10)])  # linear to the rate
    assert lrs[10] == pytest.approx(0.01)  # the cosine starts at the full rate ...
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # ... and only decreases ...
    assert lrs[-1] < 0.0002  # ... to about 0 in the last batch

    plateau = make_params({"train": {"epochs": 4, "learning_rate": 0.01, "warmup_epochs": 1}})
    assert lr_at(plateau, 4, steps) == pytest.approx(0.005)
    assert lr_at(plateau, 10, steps) is None  # after the warm-up ReduceLROnPlateau owns the rate
    assert lr_at(make_params(), 0, steps) is None  # no warm-up, plateau: nothing set per batch


def test_recipe_params_are_checked(make_params):
    with pytest.raises(UserError, match="weight_decay needs train.optimizer adamw or sgd"):
        make_params({"train": {"weight_decay": 0.01}})
    with pytest.raises(UserError, match="warmup_epochs"):
        make_params({"train": {"epochs": 3, "warmup_epochs": 3}})
    with pytest.raises(UserError, match="label_smoothing"):
        make_params({"train": {"label_smoothing": 1.0}})


def test_weight_decay_spares_batch_norm_and_biases(make_params):
    """One optimizer step with zero gradients: only weight decay moves a variable, and it moves the kernels alone
    (every variable set to 1 first, so that a decayed bias, beta or gamma would show)."""
    model = build_resnet(16, 3, blocks=(1,), base_width=2, head_units=4)
    variables = model.trainable_variables
    for opt_name in ("adamw", "sgd"):
        opt = make_optimizer(make_params({"train": {"optimizer": opt_name, "weight_decay": 0.05}}))
        for v in variables:
            v.assign(np.ones(v.shape, "float32"))
        opt.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in variables])
        moved = {v.name for v in variables if not np.all(v.numpy() == 1.0)}
        assert moved == {"kernel"}, (opt_name, moved)
        assert all((v.numpy() < 1.0).all() for v in variables if v.name == "kernel"), opt_name  # towards 0
    sgd = make_optimizer(make_params({"train": {"optimizer": "sgd"}}))
    assert sgd.nesterov and sgd.momentum == 0.9 and not sgd.weight_decay


def test_mixup_blends_each_image_and_its_target_with_one_partner_of_the_batch():
    """inputs.mixup: row i becomes λᵢ·xᵢ + (1-λᵢ)·x_π(i) and its target the same blend of the two targets, with the
    same λᵢ; π is a permutation of the batch and λ is drawn per row; the same seed and batch start give the same
    draws, another batch start (rows[0]) or seed other ones."""
    n = 8
    x = np.random.default_rng(0).uniform(0, 255, (n, 3, 3, 1)).astype(np.float32)
    y = np.eye(n, dtype=np.float32)  # each row's target names the row: a blended target shows the partner and λ
    rows = np.arange(100, 100 + n, dtype=np.int64)

    def draw(rows, seed):
        mx, my = (t.numpy() for t in mixup(x, y, rows, 0.4, seed=seed))
        lam = my[np.arange(n), np.arange(n)]  # the weight of the row's own target
        others = np.where(np.eye(n, dtype=bool), -1.0, my)
        partner = np.where(lam > 1 - 1e-6, np.arange(n), others.argmax(1))  # λ = 1: its own partner
        return mx, my, lam, partner

    mx, my, lam, partner = draw(rows, 7)
    assert sorted(partner.tolist()) == list(range(n)) and (partner != np.arange(n)).any()  # pairs within the batch
    assert ((lam >= 0) & (lam <= 1)).all() and len(np.unique(lam)) > n // 2  # one λ per row
    np.testing.assert_allclose(my, lam[:, None] * y + (1 - lam[:, None]) * y[partner], atol=1e-6)
    blend = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
    np.testing.assert_allclose(mx, blend, rtol=1e-5, atol=1e-3)  # the images: the same λ and partner
    again = draw(rows, 7)
    assert np.array_equal(again[0], mx) and np.array_equal(again[1], my)
    for other in (draw(rows + 1, 7), draw(rows, 8)):  # another batch start, another seed: other λ and pairs
        assert not np.allclose(other[2], lam) and not np.array_equal(other[3], partner)


def test_mixup_only_blends_training_batches(tmp_path, make_params):
    import cv2

    params = make_params({"crop": {"image_size": 8}, "train": {"batch_size": 8, "mixup_alpha": 0.4}})
    rows = []
    for i in range(16):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((8, 8), i * 10, np.uint8))
        rows.append({"path": str(p), "label": params.class_names[i % 7]})
    table = pd.DataFrame(rows)
    soft = np.concatenate([y for _, y in make_dataset(params, table, training=True)])
    hard = np.concatenate([y for _, y in make_dataset(params, table, training=False)])
    assert np.allclose(soft.sum(1), 1) and (soft.max(1) < 1).any()  # blended targets
    assert set(np.unique(hard)) == {0.0, 1.0}  # validation batches untouched
    again = np.concatenate([y for _, y in make_dataset(params, table, training=True)])
    assert np.array_equal(again, soft)  # a function of the seed


def test_flip_tta_averages_the_face_and_its_mirror(tmp_path):
    base = build_resnet(16, 3, blocks=(1,), base_width=2, head_units=0, seed=1)
    tta = with_flip_tta(base)
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 1)).astype(np.float32)
    want = (base.predict(x, verbose=0) + base.predict(x[:, :, ::-1], verbose=0)) / 2
    assert np.allclose(tta.predict(x, verbose=0), want, atol=1e-6)
    assert np.allclose(tta.predict(x[:, :, ::-1], verbose=0), tta.predict(x, verbose=0), atol=1e-6)  # symmetric
    assert tta.count_params() == base.count_params()  # shared weights
    path = tmp_path / "tta.keras"
    tta.save(path)
    loaded = keras.models.load_model(path, compile=False)  # registered: kfer.serving.layers is imported
    assert np.allclose(loaded.predict(x, verbose=0), want, atol=1e-6)
    assert np.array_equal(HorizontalFlip()(x).numpy(), x[:, :, ::-1])


def test_compact_stem_halves_the_resolution_once():
    imagenet = build_resnet(48, 6, blocks=(1, 1), base_width=4, head_units=0)
    compact = build_resnet(48, 6, blocks=(1, 1), base_width=4, head_units=0, stem="compact")
    assert imagenet.get_layer("conv2_block1_out").output.shape[1] == 12  # 48 / 4
    assert compact.get_layer("conv2_block1_out").output.shape[1] == 24  # 48 / 2
    assert "pool1_pool" not in {layer.name for layer in compact.layers}
    with pytest.raises(ValueError, match="stem"):
        build_resnet(48, 6, blocks=(1,), stem="cifar")


@pytest.mark.training
def test_run_with_every_knob_is_tracked_and_serves_the_tta_model(tmp_path, make_params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = json.loads(json.dumps(TINY))
    over["model"].update({"stem": "compact", "tta_flip": True})
    over["train"].update({"epochs": 3, "warmup_epochs": 1, "lr_schedule": "cosine", "optimizer": "adamw",
                          "weight_decay": 0.01, "label_smoothing": 0.1, "mixup_alpha": 0.2})
    params = prepare_demo(make_params(over))
    result = run_train(params)
    history = pd.read_csv(params.path(params.paths.history))
    lr = history["learning_rate"].tolist()
    assert lr[0] == pytest.approx(params.train.learning_rate)  # end of the warm-up epoch: the full rate
    assert lr[0] > lr[1] > lr[2]  # then the cosine, per batch
    saved = keras.models.load_model(params.path(params.paths.model), compile=False)
    assert saved.get_layer("tta_flip") is not None and saved.get_layer("mirror") is not None
    assert getattr(saved, "optimizer", None) is None  # served: weights only
    run = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(result["run_id"])
    assert run.data.params["train.mixup_alpha"] == "0.2" and run.data.params["model.tta_flip"] == "True"
