# usage: bash tools/bitcheck.sh SCRIPT OUTROOT -- six epochs of four configurations on the bundled demo (HALD, hard,
# soft seed 1 with instance norm, hybrid with top-3 labels; each names its student and HALD its split, so scripts with other defaults
# compare); prints a digest of each trained student, its top-1/top-5 and drift.
# Run it with an older copy of hald.py and with the current one: equal lines mean the training path is bit-identical.
set -e
S=$1; O=$2
export OMP_NUM_THREADS=1
run() { name=$1; shift; .venv/bin/python $S --overwrite --epochs 6 --eval-every 3 --drift-crops 2 --out $O/$name --save-model $O/$name.pt "$@" > $O/$name.log 2>&1 || { echo "$name FAILED"; tail -3 $O/$name.log; }; }
mkdir -p $O
run demo --slc 10 --schedule shs --soft-epochs 3 --model convnet_bn
run demo_s2_hard --slc 20 --schedule hard --model convnet_bn --data demo/distilled --val demo/val
run demo_soft_seed1 --slc 20 --schedule soft --seed 1 --model convnet --data demo/distilled --val demo/val --teacher demo/teacher.pt
run demo_hybrid --slc 10 --schedule hybrid --model convnet_bn --data demo/distilled --val demo/val --teacher demo/teacher.pt --label-topk 3
for f in $O/*.pt; do .venv/bin/python -c "
import torch,hashlib,json
sd=torch.load('$f',weights_only=True)['state_dict']
h=hashlib.sha256(b''.join(v.numpy().tobytes() for k,v in sorted(sd.items())))
s=json.load(open('$f'[:-3]+'/summary.json'))
print('$(basename $f)', h.hexdigest()[:16], s['final_top1'], s['final_top5'], json.dumps(s['drift'],sort_keys=True)[:80])
"; done
