# GPU image for the real tables: docker build -t farconf . && docker run --gpus all -v $PWD/datasets:/app/datasets farconf \
#   python train.py --dataset CIFAR10 --method acet
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV DATA_ROOT=/app/datasets
CMD ["python", "train.py", "--help"]
