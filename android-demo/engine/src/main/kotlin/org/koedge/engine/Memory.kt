package org.koedge.engine

import java.io.File

/** Resident memory from /proc (Linux and Android); null elsewhere. */
object Memory {
    private fun status(key: String): Long? = try {
        File("/proc/self/status").readLines().firstOrNull { it.startsWith("$key:") }
            ?.split(Regex("\\s+"))?.getOrNull(1)?.toLongOrNull()?.times(1024)
    } catch (err: java.io.IOException) {
        null
    }

    /** VmHWM: the most resident memory this process has had (mapped weights included). */
    fun peakRss(): Long? = status("VmHWM")

    fun currentRss(): Long? = status("VmRSS")
}
