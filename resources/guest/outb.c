/* fv-outb: write one byte to an x86 I/O port from guest userspace.
 *
 * The Debian cloud kernel has no /dev/port, so the guest init uses this tiny
 * helper to reach faultvisor's debug-exit (0xf4) and boot-timer ports.
 * Usage: fv-outb PORT VALUE   (both accept 0x-prefixed hex or decimal)
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: fv-outb PORT VALUE\n");
        return 2;
    }
    unsigned long port = strtoul(argv[1], NULL, 0);
    unsigned long value = strtoul(argv[2], NULL, 0);
    if (port > 0xffff || value > 0xff) {
        fprintf(stderr, "fv-outb: port must be <= 0xffff and value <= 0xff\n");
        return 2;
    }
    if (iopl(3) != 0) {
        perror("fv-outb: iopl");
        return 1;
    }
    outb((unsigned char)value, (unsigned short)port);
    return 0;
}
