"""A gradient-matching script in the shape of the reference's main.py (written for fastdd's tests)."""
import argparse

import numpy as np
import torch
import torch.nn as nn
from utils import (
    DiffAugment,
    ParamDiffAug,
    TensorDataset,
    epoch,
    evaluate_synset,
    get_daparam,
    get_dataset,
    get_eval_pool,
    get_loops,
    get_network,
    match_loss,
)

parser = argparse.ArgumentParser()
parser.add_argument("--method", default="DSA")
parser.add_argument("--dataset", default="FashionMNIST")
parser.add_argument("--model", default="ConvNet")
parser.add_argument("--ipc", type=int, default=1)
parser.add_argument("--eval_mode", default="S")
parser.add_argument("--epoch_eval_train", type=int, default=20)
parser.add_argument("--Iteration", type=int, default=3)
parser.add_argument("--lr_img", type=float, default=0.1)
parser.add_argument("--lr_net", type=float, default=0.01)
parser.add_argument("--batch_real", type=int, default=32)
parser.add_argument("--batch_train", type=int, default=256)
parser.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate")
parser.add_argument("--data_path", default="data")
parser.add_argument("--dis_metric", default="ours")
args = parser.parse_args()
args.outer_loop, args.inner_loop = get_loops(args.ipc)
args.device = "cuda" if torch.cuda.is_available() else "cpu"
args.dsa_param = ParamDiffAug()
args.dsa = args.method == "DSA"

channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(args.dataset, args.data_path)
model_eval_pool = get_eval_pool(args.eval_mode, args.model, args.model)
images_all, labels_all = next(iter(torch.utils.data.DataLoader(dst_train, batch_size=len(dst_train))))
indices_class = [torch.where(labels_all == c)[0] for c in range(num_classes)]
torch.manual_seed(0)


def get_images(c, n):  # n random real images of class c
    return images_all[indices_class[c][torch.randperm(len(indices_class[c]))[:n]]]


image_syn = torch.randn(num_classes * args.ipc, channel, *im_size, requires_grad=True)
for c in range(num_classes):  # initialise from real images
    image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data
label_syn = torch.tensor(np.array([np.ones(args.ipc) * i for i in range(num_classes)]), dtype=torch.long).view(-1)
optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
criterion = nn.CrossEntropyLoss()
args.dc_aug_param = get_daparam(args.dataset, args.model, args.model, args.ipc)
for it in range(args.Iteration):
    net = get_network(args.model, channel, num_classes, im_size)
    net_parameters = list(net.parameters())
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    for ol in range(args.outer_loop):
        loss = torch.tensor(0.0)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            lab_real = torch.full((img_real.shape[0],), c, dtype=torch.long)
            img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc]
            lab_syn = torch.full((args.ipc,), c, dtype=torch.long)
            if args.dsa:  # the same augmentation for both sides
                seed = int(torch.randint(1 << 30, ()))
                img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
                img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
            gw_real = [g.detach() for g in torch.autograd.grad(criterion(net(img_real), lab_real), net_parameters)]
            gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), net_parameters, create_graph=True)
            loss = loss + match_loss(gw_syn, gw_real, args)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        if ol == args.outer_loop - 1:
            break
        trainloader = torch.utils.data.DataLoader(TensorDataset(image_syn.detach(), label_syn), batch_size=256,
                                                  shuffle=True)
        for _ in range(args.inner_loop):
            epoch("train", trainloader, net, optimizer_net, criterion, args, aug=args.dsa)
    print(f"iter {it} loss {float(loss) / num_classes:.4f}")

for model_eval in model_eval_pool:  # train fresh networks on the final set, test them
    net_eval = get_network(model_eval, channel, num_classes, im_size)
    _, acc_train, acc_test = evaluate_synset(0, net_eval, image_syn.detach(), label_syn, testloader, args)
    print(f"ACCURACY {model_eval} {acc_test:.4f}")
