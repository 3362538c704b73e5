package org.koedge.demo

import android.app.Activity
import android.app.ActivityManager
import android.content.Context
import android.graphics.Typeface
import android.os.Bundle
import android.os.Handler
import android.os.Looper
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.io.File

/**
 * The demo screen, built in code (no AndroidX, no layouts): the bundles pushed to
 * /sdcard/Android/data/org.koedge.demo/files/ (or the app's internal files folder), the chosen bundle's
 * model card, a prompt, Generate / Stop, the streamed text, and TTFT, decode tok/s and resident memory.
 */
class MainActivity : Activity(), DemoController.Listener {
    lateinit var controller: DemoController
        private set
    lateinit var bundleList: LinearLayout
        private set
    lateinit var card: TextView
        private set
    lateinit var prompt: EditText
        private set
    lateinit var output: TextView
        private set
    lateinit var stats: TextView
        private set
    lateinit var generateButton: Button
        private set
    lateinit var stopButton: Button
        private set
    private val main = Handler(Looper.getMainLooper())

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val folder = bundlesFolder()
        controller = DemoController(folder, AvailableMemory(this), Poster(main), this)
        setContentView(buildViews(folder))
        refreshBundles()
    }

    override fun onDestroy() {
        controller.close()
        super.onDestroy()
    }

    /** External app files (adb push works without root), else internal files. */
    private fun bundlesFolder(): File = getExternalFilesDir(null) ?: filesDir

    private fun buildViews(folder: File): View {
        val root = LinearLayout(this)
        root.orientation = LinearLayout.VERTICAL
        root.setPadding(24, 24, 24, 24)
        val title = TextView(this)
        title.text = "koedge · bundles in ${folder.path}"
        title.setTypeface(null, Typeface.BOLD)
        root.addView(title)
        bundleList = LinearLayout(this)
        bundleList.orientation = LinearLayout.VERTICAL
        root.addView(bundleList)
        card = TextView(this)
        card.text = "Choose a bundle."
        root.addView(card)
        prompt = EditText(this)
        prompt.setText("대한민국의 수도는")
        root.addView(prompt)
        val buttons = LinearLayout(this)
        buttons.orientation = LinearLayout.HORIZONTAL
        generateButton = Button(this)
        generateButton.text = "Generate"
        generateButton.isEnabled = false
        generateButton.setOnClickListener(Click { onGenerate() })
        stopButton = Button(this)
        stopButton.text = "Stop"
        stopButton.isEnabled = false
        stopButton.setOnClickListener(Click { controller.stop() })
        buttons.addView(generateButton)
        buttons.addView(stopButton)
        root.addView(buttons)
        stats = TextView(this)
        root.addView(stats)
        output = TextView(this)
        output.textSize = 16f
        val scroll = ScrollView(this)
        scroll.addView(output)
        root.addView(scroll, LinearLayout.LayoutParams(LinearLayout.LayoutParams.MATCH_PARENT, 0, 1f))
        return root
    }

    fun refreshBundles() {
        bundleList.removeAllViews()
        val bundles = controller.bundles()
        if (bundles.isEmpty()) {
            val hint = TextView(this)
            hint.text = "No bundle yet: adb push build/ko-phone ${bundlesFolder().path}/ko-phone"
            bundleList.addView(hint)
        }
        for (folder in bundles) {
            val button = Button(this)
            button.text = folder.name
            button.setOnClickListener(Click { onChoose(folder) })
            bundleList.addView(button)
        }
        for (stray in controller.strays()) {
            val note = TextView(this)
            note.text = "${stray.name}: not a koedge bundle (no koedge.json)"
            bundleList.addView(note)
        }
    }

    private fun onChoose(folder: File) {
        generateButton.isEnabled = false
        controller.load(folder)
    }

    private fun onGenerate() {
        output.text = ""
        stats.text = "generating…"
        generateButton.isEnabled = false
        stopButton.isEnabled = true
        controller.generate(prompt.text.toString())
    }

    // --- DemoController.Listener (main thread) -----------------------------------------------------------------
    override fun onStatus(text: String) { card.text = text }

    override fun onLoaded(card: String) {
        this.card.text = card
        generateButton.isEnabled = true
    }

    override fun onText(piece: String) { output.append(piece) }

    override fun onFinished(stats: String) {
        this.stats.text = stats
        generateButton.isEnabled = true
        stopButton.isEnabled = false
    }

    override fun onError(message: String) {
        card.text = message
        stats.text = ""
        stopButton.isEnabled = false
        generateButton.isEnabled = false
    }

    // --- small classes instead of lambdas (ART without D8 desugaring) ------------------------------------------
    private class Click(private val body: () -> Unit) : View.OnClickListener {
        override fun onClick(view: View) = body()
    }

    private class Poster(private val handler: Handler) : (Runnable) -> Unit {
        override fun invoke(task: Runnable) { handler.post(task) }
    }

    private class AvailableMemory(private val context: Context) : () -> Long {
        override fun invoke(): Long {
            val manager = context.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
            val info = ActivityManager.MemoryInfo()
            manager.getMemoryInfo(info)
            return info.availMem
        }
    }
}
