python prepare.py    # writes train.pt, validation.npz, weights.pt and flipped.txt

influx rank --model tiny_model:make_model --weights weights.pt \
    --train train.pt --validation validation.npz \
    --top 8 --out ranking.csv --fit-out fit.pt
influx info fit.pt

influx matrix --model tiny_model:make_model --weights weights.pt \
    --train train.pt --test validation.npz --batch-size 32 --out influences.zarr
influx status influences.zarr
