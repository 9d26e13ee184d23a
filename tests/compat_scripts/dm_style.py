"""A distribution-matching script in the shape of the reference's main_DM.py (written for fastdd's tests)."""
import argparse

import numpy as np
import torch
from torchvision.utils import save_image  # noqa: F401  (the reference scripts import it)
from utils import DiffAugment, ParamDiffAug, evaluate_synset, get_dataset, get_eval_pool, get_network

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", default="FashionMNIST")
parser.add_argument("--model", default="ConvNet")
parser.add_argument("--ipc", type=int, default=1)
parser.add_argument("--eval_mode", default="S")
parser.add_argument("--epoch_eval_train", type=int, default=20)
parser.add_argument("--Iteration", type=int, default=5)
parser.add_argument("--lr_img", type=float, default=1.0)
parser.add_argument("--lr_net", type=float, default=0.01)
parser.add_argument("--batch_real", type=int, default=32)
parser.add_argument("--batch_train", type=int, default=256)
parser.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate")
parser.add_argument("--data_path", default="data")
args = parser.parse_args()
args.device = "cuda" if torch.cuda.is_available() else "cpu"
args.dsa_param = ParamDiffAug()
args.dsa = args.dsa_strategy not in ("none", "None")

channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(args.dataset, args.data_path)
model_eval_pool = get_eval_pool(args.eval_mode, args.model, args.model)
images_all = torch.cat([torch.unsqueeze(dst_train[i][0], dim=0) for i in range(len(dst_train))])
labels_all = [int(dst_train[i][1]) for i in range(len(dst_train))]
indices_class = [[] for _ in range(num_classes)]
for i, lab in enumerate(labels_all):
    indices_class[lab].append(i)
rng = np.random.RandomState(0)


def get_images(c, n):
    return images_all[rng.permutation(indices_class[c])[:n]]


image_syn = torch.cat([get_images(c, args.ipc) for c in range(num_classes)]).detach().clone().requires_grad_(True)
label_syn = torch.tensor(np.repeat(np.arange(num_classes), args.ipc))
optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
for it in range(args.Iteration + 1):
    if it == args.Iteration:
        for model_eval in model_eval_pool:
            net_eval = get_network(model_eval, channel, num_classes, im_size)
            _, acc_train, acc_test = evaluate_synset(0, net_eval, image_syn.detach(), label_syn, testloader, args)
            print(f"ACCURACY {model_eval} {acc_test:.4f}")
        break
    net = get_network(args.model, channel, num_classes, im_size)
    for p in net.parameters():
        p.requires_grad = False
    loss = torch.tensor(0.0)
    for c in range(num_classes):
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc]
        seed = int(rng.randint(1 << 30))
        img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
        img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        loss = loss + ((net.embed(img_real).mean(0) - net.embed(img_syn).mean(0)) ** 2).sum()
    optimizer_img.zero_grad()
    loss.backward()
    optimizer_img.step()
    print(f"iter {it} loss {float(loss) / num_classes:.4f}")
