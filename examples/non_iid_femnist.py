"""Non-IID data, as "How can TensorFlow Federated handle non-IID data in the FEMNIST dataset?"
(and the non-IID chapter's lessons on label skew and local epochs), on phones through Overnight.

Each phone holds one writer's characters (FEMNIST's natural non-IID split, 62 classes) or,
without EMNIST files, a Dirichlet(alpha) label-skewed share of the digits: smaller `--alpha`
is more skewed. The tutorial's CNN, client SGD at 0.02 and server Adam, 10 clients reused
every round for 10 rounds, and its aggregators:

  --aggregator mean      tff.aggregators.UnweightedMeanFactory()  (the tutorial's Mean())
  --aggregator weighted  tff.aggregators.MeanFactory()            (its WeightedMean())
  --aggregator dp        tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
                           noise_multiplier=0.5, clients_per_round=10, clip=1.0)
                         (its dp_aggregator with l2_norm_clip=1.0)

More local epochs (`--epochs`) let each phone drift further towards its own data; compare
the training and held-out accuracy as they grow.

    python examples/non_iid_femnist.py [--emnist-dir DIR] [--aggregator dp] [--quick]
"""

from __future__ import annotations

import tutorial_support as tutorial

NUM_CLIENTS = 10
NUM_ROUNDS = 10
BATCH_SIZE = 20
# The tutorial's server Adam runs at 1.0. On the digits that blows the CNN up (training loss
# 2.05 in round 1, about 1e6 in round 2), so the default is a rate at which it learns;
# `--server-learning-rate 1.0` runs the tutorial's.
SERVER_LEARNING_RATE = 0.01


def main() -> None:
    options = tutorial.parser(__doc__, rounds=NUM_ROUNDS, phones=NUM_CLIENTS)
    options.add_argument("--aggregator", choices=("mean", "weighted", "dp"), default="mean")
    options.add_argument("--alpha", type=float, default=0.3, help="digits' label skew")
    options.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    options.add_argument("--server-learning-rate", type=float, default=SERVER_LEARNING_RATE)
    args = options.parse_args()
    filters, dense_units = (32, 64), 128
    if args.quick:
        args.rounds, args.phones, filters, dense_units = 2, 4, (8, 16), 32
    clients_per_round = min(NUM_CLIENTS, args.phones)
    deadlines = tutorial.deadlines(args)
    data = tutorial.load(args, only_digits=False, alpha=args.alpha)

    import tensorflow as tf
    import tensorflow_federated as tff

    height, width = data.image_shape
    # The tutorial's valid 3x3 convolutions need its 28x28 characters; on 8x8 digits they
    # would leave nothing to pool, so the digits keep their size through them.
    padding = "valid" if min(height, width) >= 28 else "same"

    def create_keras_model() -> tf.keras.Model:
        return tf.keras.models.Sequential(
            [
                tf.keras.layers.Reshape((height, width, 1), input_shape=(height, width)),
                tf.keras.layers.Conv2D(filters[0], (3, 3), activation="relu", padding=padding),
                tf.keras.layers.MaxPool2D(pool_size=(2, 2)),
                tf.keras.layers.Conv2D(filters[1], (3, 3), activation="relu", padding=padding),
                tf.keras.layers.MaxPool2D(pool_size=(2, 2)),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(dense_units, activation="relu"),
                tf.keras.layers.Dense(data.num_classes, activation="softmax"),
            ]
        )

    match args.aggregator:
        case "mean":
            model_aggregator = tff.aggregators.UnweightedMeanFactory()
        case "weighted":
            model_aggregator = tff.aggregators.MeanFactory()
        case "dp":
            model_aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
                noise_multiplier=0.5, clients_per_round=clients_per_round, clip=1.0
            )
        case other:
            raise AssertionError(other)

    with tutorial.coordinator(args, data) as deployment:
        task = deployment.client.create_task(
            tutorial.task_id(f"non-iid-{args.aggregator}"),
            population=args.population,
            model=create_keras_model,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            client_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=0.02),
            server_optimizer=tff.learning.optimizers.build_adam(
                learning_rate=args.server_learning_rate
            ),
            aggregator=model_aggregator,
            rounds=args.rounds,
            clients_per_round=clients_per_round,
            over_selection=1.0,  # the tutorial trains the same 10 clients every round
            epochs=args.epochs,
            batch_size=BATCH_SIZE,
            selection_deadline_s=deadlines.selection_s,
            reporting_deadline_s=deadlines.reporting_s,
        )
        with deployment.phones():
            for result in task.rounds(progress=False):
                if not result.committed:
                    print(f"round {result.round_number:2d} {result.state}: retried")
                    continue
                print(f"round {result.round_number:2d}, metrics={result.tff_metrics}", flush=True)


if __name__ == "__main__":
    main()
