"""Target of the `verl.plugins` entry point: verl imports this module when `verl` is imported (verl 0.9.1
loads each entry point of the group and ignores its value), and importing it registers `ptr_cppo`,
`ptr_dppo_tv`, `ptr_dppo_kl` and `ptr_vanilla`."""

from .verl import register

register()
