package org.koedge.demo

import android.app.ActivityManager
import android.content.Context
import android.os.Looper
import android.widget.Button
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assume.assumeTrue
import org.junit.Test
import org.junit.runner.RunWith
import org.robolectric.Robolectric
import org.robolectric.RobolectricTestRunner
import org.robolectric.RuntimeEnvironment
import org.robolectric.Shadows.shadowOf
import org.robolectric.annotation.Config
import java.io.File
import java.io.RandomAccessFile

/**
 * The Activity under Robolectric (API 35 framework, onnxruntime's desktop natives): open it, choose a tiny
 * bundle, generate, and the streamed text is the Python runtime's; an over-budget bundle and a truncated one
 * show one message each, without a crash.
 *
 * The bundle and the expected text come from tests/test_android_app.py (system properties koedge.test.bundles:
 * a folder with `tiny/` and `expected.txt`); run alone with Maven these tests are skipped.
 */
@RunWith(RobolectricTestRunner::class)
@Config(sdk = [35], manifest = Config.NONE)
class MainActivityTest {
    private val source: File? = System.getProperty("koedge.test.bundles")?.takeIf { it.isNotBlank() }?.let(::File)

    private fun install(name: String): File {
        assumeTrue("koedge.test.bundles is not set (tests/test_android_app.py sets it)", source != null)
        val files = RuntimeEnvironment.getApplication().getExternalFilesDir(null)!!
        val target = File(files, name)
        File(source, "tiny").copyRecursively(target, overwrite = true)
        return target
    }

    private fun settle(activity: MainActivity, seconds: Int = 120) {
        val deadline = System.currentTimeMillis() + seconds * 1000L
        do {
            shadowOf(Looper.getMainLooper()).idle()
            Thread.sleep(20)
            shadowOf(Looper.getMainLooper()).idle()
        } while (activity.controller.busy && System.currentTimeMillis() < deadline)
        assertFalse("still busy after $seconds s", activity.controller.busy)
    }

    private fun setAvailableMemory(bytes: Long) {
        val context = RuntimeEnvironment.getApplication()
        val manager = context.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
        val info = ActivityManager.MemoryInfo()
        info.availMem = bytes
        info.totalMem = 3L shl 30
        shadowOf(manager).setMemoryInfo(info)
    }

    private fun buttonFor(activity: MainActivity, name: String): Button =
        (0 until activity.bundleList.childCount).map { activity.bundleList.getChildAt(it) }
            .filterIsInstance<Button>().first { it.text.toString() == name }

    @Test
    fun loadsATinyBundleAndStreamsThePythonRuntimesText() {
        install("tiny")
        setAvailableMemory(2L shl 30)
        val activity = Robolectric.buildActivity(MainActivity::class.java).setup().get()
        buttonFor(activity, "tiny").performClick()
        settle(activity)
        assertTrue(activity.card.text.toString(), activity.card.text.contains("passes:"))
        assertTrue(activity.generateButton.isEnabled)
        activity.generateButton.performClick()
        settle(activity)
        val expected = File(source, "expected.txt").readText(Charsets.UTF_8)
        assertTrue(expected.isNotEmpty())
        assertEquals(expected, activity.output.text.toString())
        assertTrue(activity.stats.text.toString(), activity.stats.text.contains("tok/s") && activity.stats.text.contains("RSS"))
        activity.finish()
    }

    @Test
    fun aBundleOverTheMemoryBudgetIsRefusedWithOneMessage() {
        install("tiny")
        setAvailableMemory(1L shl 20) // 1 MiB available: the tiny bundle's prediction is more
        val activity = Robolectric.buildActivity(MainActivity::class.java).setup().get()
        buttonFor(activity, "tiny").performClick()
        settle(activity)
        val text = activity.card.text.toString()
        assertTrue(text, text.contains("but this phone has 1 MiB available: not loaded"))
        assertFalse(activity.generateButton.isEnabled)
    }

    @Test
    fun aTruncatedBundleAndAStrayFolderAreNamedNotCrashed() {
        val bundle = install("broken")
        val data = bundle.listFiles()!!.first { it.name.endsWith(".onnx.data") || it.name == "model.onnx" }
        RandomAccessFile(data, "rw").use { it.setLength(data.length() / 2) }
        File(bundle.parentFile, "half-pushed").mkdirs()
        setAvailableMemory(2L shl 30)
        val activity = Robolectric.buildActivity(MainActivity::class.java).setup().get()
        buttonFor(activity, "broken").performClick()
        settle(activity)
        val text = activity.card.text.toString()
        assertTrue(text, text.contains("the copy is incomplete or damaged"))
        val notes = (0 until activity.bundleList.childCount).map { activity.bundleList.getChildAt(it) }
            .filterIsInstance<android.widget.TextView>().map { it.text.toString() }
        assertTrue(notes.toString(), notes.any { it.startsWith("half-pushed: not a koedge bundle") })
    }
}
