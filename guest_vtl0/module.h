/* The built-in modules (guest_vtl0/module.S, module-priv.S), for C and assembly. */
#ifndef VTL0_MODULE_H
#define VTL0_MODULE_H
#define MODULE_MARK 0x454C55444F4D2121  /* what the module stores at RDI ("!!MODULE") */
#define MODULE_RET  0x600D              /* what it returns */
#define MODULE_SIZE 4096                /* module.bin: one page, zero-padded */
#endif
