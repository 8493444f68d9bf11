/*
 * vddkvimaccess.c -- stand-in for VDDK's plugin libvddkVimAccess.so (vSphere API access).
 *
 * The stand-in libvixDiskLib dlopen()s it by bare name at InitEx, as the real library does.
 * Like the real plugin, it needs a library that VDDK bundles in lib64 and no system has
 * (libvmacore.so), and it carries no RPATH: both load only with <libDir>/lib64 on
 * LD_LIBRARY_PATH.
 */
#define EXPORT __attribute__((visibility("default")))

const char *Vmacore_StandinVersion(void);

EXPORT const char *VddkVimAccess_StandinInit(void) { return Vmacore_StandinVersion(); }
