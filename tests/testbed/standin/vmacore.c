/*
 * vmacore.c -- stand-in for libvmacore.so, one of the libraries VDDK bundles in lib64 that the
 * plugin libvddkVimAccess.so needs. It exists so that loading the plugin depends on the search
 * path exactly as with the real distribution.
 */
#define EXPORT __attribute__((visibility("default")))

EXPORT const char *Vmacore_StandinVersion(void) { return "vmacore stand-in 8.0"; }
