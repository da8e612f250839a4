/* The built-in modules, embedded as data (rodata: never executable where they are);
 * a scenario copies one into the module area and asks VTL1 to load it there. */
	.section .rodata
	.balign 4096
	.globl module_image, module_priv_image
module_image:
	.incbin "guest_vtl0/build/module.bin"
module_priv_image:
	.incbin "guest_vtl0/build/module-priv.bin"
